/* The shim's per-ioctl cost, run under it against a real kvmtagd (kvmtag-run ./bench).
 *
 * usage: bench [GUEST_MIB [CALLS [REPEATS]]]        defaults: 256 20000 5
 *
 * - roundtrip: KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) on the system fd, CALLS calls each timed
 *   (median, p99, mean), and this process's CPU time per call (the shim's own cost, system
 *   calls included, whatever the daemon's latency); baseline: a 64-byte ping-pong over a socketpair with a forked C child
 *   echoing on a blocking socket (the transport's floor, without kvmtagd's work);
 * - passthrough: ioctl(TCGETS) on /dev/null through the shim (an fd that is not kvmtag's)
 *   against the same call through libc's own ioctl: what the shim adds to every other fd;
 * - copy_tags: KVM_ARM_MTE_COPY_TAGS FROM_GUEST and TO_GUEST of a whole memslot of GUEST_MIB
 *   (a memfd mapped shared, MTE on), one ioctl each, REPEATS times each: median ms and GiB/s of
 *   tag bytes (GUEST_MIB/16 MiB per call).
 * Lines are "name key=value ..." for tests/test_preload.py and humans alike. */
#include "check.h"

#include <sys/resource.h>
#include <sys/socket.h>
#include <dlfcn.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU time (user + system) this process has used: the client's own cost of a call, whatever
 * the daemon's latency. */
static double cpu_time(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
         + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *name, double *t, int n)
{
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += t[i];
    qsort(t, (size_t)n, sizeof *t, by_value);
    printf("%s calls=%d median_us=%.2f p99_us=%.2f mean_us=%.2f min_us=%.2f\n", name, n,
           t[n / 2] * 1e6, t[(int)(n * 0.99)] * 1e6, sum / n * 1e6, t[0] * 1e6);
}

static void ping_pong(int calls, double *t)
{
    int sv[2];
    char buf[64] = { 0 };
    pid_t pid;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
        exit(1);
    pid = fork();
    if (pid == 0) {
        close(sv[0]);
        for (;;) {
            ssize_t n = recv(sv[1], buf, sizeof buf, MSG_WAITALL);
            if (n <= 0 || send(sv[1], buf, (size_t)n, 0) != n)
                _exit(0);
        }
    }
    close(sv[1]);
    for (int i = -1000; i < calls; i++) {
        double start = now();
        if (send(sv[0], buf, sizeof buf, 0) != sizeof buf || recv(sv[0], buf, sizeof buf, MSG_WAITALL) != sizeof buf)
            exit(1);
        if (i >= 0)
            t[i] = now() - start;
    }
    close(sv[0]);
    waitpid(pid, NULL, 0);
}

int main(int argc, char **argv)
{
    size_t guest = (size_t)(argc > 1 ? atol(argv[1]) : 256) << 20;
    int calls = argc > 2 ? atoi(argv[2]) : 20000;
    int repeats = argc > 3 ? atoi(argv[3]) : 5;
    double *t = calloc((size_t)calls, sizeof *t), from[64], to[64], start;
    size_t ntags = guest / 16;
    uint8_t *in, *out, *ram;
    struct termios term;
    int kvm, vm, null_fd;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (repeats > 64)
        repeats = 64;
    ping_pong(calls, t); /* forked before any kvmtag fd exists */
    report("socketpair_pingpong_64B", t, calls);

    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0 || !is_socket(kvm)) {
        printf("FAIL /dev/kvm is not kvmtagd's (run under the shim)\n");
        return 1;
    }
    double cpu = 0;
    for (int i = -1000; i < calls; i++) {
        if (i == 0)
            cpu = cpu_time();
        start = now();
        if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1)
            return 1;
        if (i >= 0)
            t[i] = now() - start;
    }
    cpu = cpu_time() - cpu;
    report("check_extension", t, calls);
    printf("check_extension_client_cpu calls=%d cpu_us_per_call=%.2f\n", calls, cpu / calls * 1e6);

    null_fd = open("/dev/null", O_RDWR);
    for (int i = -1000; i < calls; i++) {
        start = now();
        ioctl(null_fd, TCGETS, &term);
        if (i >= 0)
            t[i] = now() - start;
    }
    report("passthrough_ioctl_shim", t, calls);
    /* libc's own ioctl, past the shim (no raw syscall(): arm64's <asm/unistd.h> is in use). */
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    int (*libc_ioctl)(int, unsigned long, ...) = libc ? (int (*)(int, unsigned long, ...))dlsym(libc, "ioctl") : NULL;
    if (!libc_ioctl)
        return 1;
    for (int i = -1000; i < calls; i++) {
        start = now();
        libc_ioctl(null_fd, TCGETS, &term);
        if (i >= 0)
            t[i] = now() - start;
    }
    report("passthrough_ioctl_libc", t, calls);

    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0 || enable_mte(vm))
        return 1;
    ram = memfd_ram(guest, NULL);
    if (set_region(vm, 0, 0, GPA, guest, ram))
        return 1;
    in = anon(ntags);
    out = anon(ntags);
    fill_tags(in, ntags, 1);
    if (copy_tags(vm, GPA, guest, in, KVM_ARM_TAGS_TO_GUEST) != (int)guest) /* warm up */
        return 1;
    for (int r = 0; r < repeats; r++) {
        start = now();
        if (copy_tags(vm, GPA, guest, out, KVM_ARM_TAGS_FROM_GUEST) != (int)guest)
            return 1;
        from[r] = now() - start;
        start = now();
        if (copy_tags(vm, GPA, guest, in, KVM_ARM_TAGS_TO_GUEST) != (int)guest)
            return 1;
        to[r] = now() - start;
    }
    if (memcmp(in, out, ntags)) {
        printf("FAIL FROM_GUEST did not read back the tags TO_GUEST wrote\n");
        return 1;
    }
    qsort(from, (size_t)repeats, sizeof *from, by_value);
    qsort(to, (size_t)repeats, sizeof *to, by_value);
    printf("copy_tags_from_guest guest_mib=%zu tag_mib=%zu median_ms=%.1f min_ms=%.1f gib_per_s=%.2f\n",
           guest >> 20, ntags >> 20, from[repeats / 2] * 1e3, from[0] * 1e3,
           (double)ntags / from[repeats / 2] / (1 << 30));
    printf("copy_tags_to_guest guest_mib=%zu tag_mib=%zu median_ms=%.1f min_ms=%.1f gib_per_s=%.2f\n",
           guest >> 20, ntags >> 20, to[repeats / 2] * 1e3, to[0] * 1e3,
           (double)ntags / to[repeats / 2] / (1 << 30));
    close(vm);
    close(kvm);
    close(null_fd);
    free(t);
    return 0;
}
