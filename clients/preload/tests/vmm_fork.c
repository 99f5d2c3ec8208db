/* fork: the child's system fds are reconnected onto the same numbers (close-on-exec kept),
 * its VM and vCPU fds answer EIO, as KVM does for a process other than the VM's creator (and
 * the VM's shared window is not mapped in it); a lock held by another thread at fork does not
 * hold up the child; the parent carries on. */
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/wait.h>

static atomic_int stop;
static atomic_long hammered;

static void *hammer(void *arg)
{
    int fd = (int)(intptr_t)arg;
    while (!atomic_load(&stop)) {
        if (ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1) {
            printf("FAIL hammer on fd %d: errno %d\n", fd, errno);
            exit(1);
        }
        atomic_fetch_add(&hammered, 1);
    }
    return NULL;
}

/* The shared windows mapped in this process (kvmtagd names their memfd "kvmtag-window"). */
static int count_windows(void)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    int n = 0;

    if (!maps)
        return -1;
    while (fgets(line, sizeof line, maps))
        n += strstr(line, "/memfd:kvmtag-window") != NULL;
    fclose(maps);
    return n;
}

static ino_t ino_of(int fd)
{
    struct stat st;
    return fstat(fd, &st) ? 0 : st.st_ino;
}

/* The child's checks; exits 0 when all pass. */
static void child(int kvm, int kvm_dup, int kvm_inheritable, int vm, int vcpu, uint8_t *ram,
                  const uint8_t *tags, ino_t parent_ino)
{
    uint8_t out[8 * TPP];
    int vm2;

    memset(out, 0xee, sizeof out); /* see SENTINEL in check.h */

    printf("# child pid %d\n", (int)getpid());
    CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "child: the system fd works");
    CHECK_EQ(ioctl(kvm_dup, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "child: its dup works");
    CHECK_EQ(ioctl(kvm_inheritable, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "child: its inheritable dup works");
    CHECK(ino_of(kvm) != parent_ino, "child: the system fd is a new connection");
    CHECK(ino_of(kvm) == ino_of(kvm_dup) && ino_of(kvm) == ino_of(kvm_inheritable),
          "child: one new connection behind all three numbers");
    CHECK(is_socket(kvm), "child: still a socket");
    CHECK_EQ(cloexec_of(kvm), 1, "child: close-on-exec kept on the system fd");
    CHECK_EQ(cloexec_of(kvm_inheritable), 0, "child: and not set on the inheritable dup");
    CHECK_ERRNO(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), EIO, "child: the parent's VM fd is EIO");
    CHECK_ERRNO(copy_tags(vm, GPA, PAGE, out, KVM_ARM_TAGS_FROM_GUEST), EIO, "child: COPY_TAGS on it is EIO");
    CHECK_ERRNO(ioctl(vcpu, KVM_RUN, 0), EIO, "child: the parent's vCPU fd is EIO");
    CHECK_EQ(count_windows(), 0, "child: the parent's VM's shared window is not mapped here");
    int d = dup(vm);
    CHECK_ERRNO(ioctl(d, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), EIO, "child: a dup of the VM fd is EIO too");
    CHECK_EQ(close(d), 0, "child: close that dup");
    /* Its own VM over the memory it shares with the parent: the parent's tags are there. */
    vm2 = mte_vm(kvm);
    CHECK_EQ(count_windows(), 1, "child: its own VM has its own shared window");
    CHECK_EQ(set_region(vm2, 0, 0, GPA, 8 * PAGE, ram), 0, "child: its own VM over the shared memfd");
    CHECK_EQ(copy_tags(vm2, GPA, 8 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "child: FROM_GUEST");
    CHECK(!memcmp(out, tags, sizeof out), "child: the tags the parent wrote (they belong to the memory)");
    CHECK_EQ(close(vm2), 0, "child: close its VM");
    CHECK_EQ(count_windows(), 0, "child: its window is unmapped with it");
    CHECK_EQ(close(vm), 0, "child: close the parent's VM fd");
    CHECK_EQ(close(kvm), 0, "child: close the system fd");
    fflush(stdout);
    _exit(0);
}

static int wait_child(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(void)
{
    uint8_t tags[8 * TPP], out[8 * TPP];
    pthread_t threads[2];
    int kvm, kvm_dup, kvm_inheritable, vm, vcpu, ram_fd;
    uint8_t *ram;
    ino_t parent_ino;

    memset(out, 0xee, sizeof out); /* see SENTINEL in check.h */
    test_start("vmm_fork: fork with system, VM and vCPU fds");
    kvm = open_kvm();
    kvm_dup = fcntl(kvm, F_DUPFD_CLOEXEC, 0);
    kvm_inheritable = dup(kvm);
    parent_ino = ino_of(kvm);
    vm = mte_vm(kvm);
    ram = memfd_ram(8 * PAGE, &ram_fd);
    CHECK_EQ(set_region(vm, 0, 0, GPA, 8 * PAGE, ram), 0, "slot 0");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(vcpu >= 0, "KVM_CREATE_VCPU = %d", vcpu);
    CHECK_EQ(count_windows(), 1, "one shared window: the VM's (none for the system and vCPU fds)");
    fill_tags(tags, sizeof tags, 7);
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, tags, KVM_ARM_TAGS_TO_GUEST), 8 * PAGE, "TO_GUEST");

    /* Threads keep the system and VM fds' locks busy while the parent forks. */
    CHECK(pthread_create(&threads[0], NULL, hammer, (void *)(intptr_t)kvm) == 0, "hammer the system fd");
    CHECK(pthread_create(&threads[1], NULL, hammer, (void *)(intptr_t)vm) == 0, "hammer the VM fd");
    for (int i = 0; i < 5; i++) {
        pid_t pid;
        fflush(stdout);
        pid = fork();
        CHECK(pid >= 0, "fork %d", i);
        if (pid == 0)
            child(kvm, kvm_dup, kvm_inheritable, vm, vcpu, ram, tags, parent_ino);
        CHECK_EQ(wait_child(pid), 0, "child %d passed", i);
    }
    atomic_store(&stop, 1);
    pthread_join(threads[0], NULL);
    pthread_join(threads[1], NULL);
    CHECK(atomic_load(&hammered) > 0, "the hammer threads made %ld calls meanwhile", atomic_load(&hammered));

    CHECK(ino_of(kvm) == parent_ino, "parent: the system fd is its own connection still");
    CHECK_EQ(ioctl(kvm_inheritable, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "parent: the system fds work");
    CHECK_EQ(ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE), 1, "parent: the VM fd works");
    CHECK_EQ(copy_tags(vm, GPA, 8 * PAGE, out, KVM_ARM_TAGS_FROM_GUEST), 8 * PAGE, "parent: FROM_GUEST");
    CHECK(!memcmp(out, tags, sizeof out), "parent: its tags are intact");
    CHECK_EQ(count_windows(), 1, "parent: its VM's window is still mapped");
    CHECK_ERRNO(ioctl(vcpu, _IO(KVMIO, 0xfd), 0), EINVAL, "parent: the vCPU fd answers (an unknown ioctl: EINVAL)");

    /* fork then exec: only the fds without close-on-exec survive, as with KVM's. */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        char arg[64];
        snprintf(arg, sizeof arg, "test -e /proc/self/fd/%d && ! test -e /proc/self/fd/%d", kvm_inheritable, kvm);
        execl("/bin/sh", "sh", "-c", arg, (char *)NULL);
        _exit(127);
    }
    CHECK_EQ(wait_child(pid), 0, "exec keeps the inheritable system fd and closes the close-on-exec one");

    close(vcpu);
    close(vm);
    close(kvm_inheritable);
    close(kvm_dup);
    close(kvm);
    munmap(ram, 8 * PAGE);
    close(ram_fd);
    printf("PASS vmm_fork\n");
    return 0;
}
