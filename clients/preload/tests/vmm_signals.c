/* Signals during forwarded ioctls: a timer interrupts the program thousands of times while it
 * copies tags in bulk and makes small calls, with a handler installed without SA_RESTART. No
 * call may fail with EINTR, return another call's answer or leave the stream out of step. */
#include "check.h"

#include <signal.h>
#include <stdatomic.h>
#include <sys/time.h>

#define PAGES 16384 /* 64 MiB of guest RAM: 4 MiB of tags, 4 READ or WRITE windows per copy */

static atomic_long signals;

static void on_alarm(int sig)
{
    (void)sig;
    atomic_fetch_add(&signals, 1);
}

int main(void)
{
    struct sigaction sa = { .sa_handler = on_alarm }; /* no SA_RESTART */
    struct itimerval every = { { 0, 200 }, { 0, 200 } }, off = { { 0, 0 }, { 0, 0 } };
    uint8_t *in = anon(PAGES * TPP), *out = anon(PAGES * TPP);
    uint8_t *ram;
    int kvm, vm;

    test_start("vmm_signals: a signal every 200 us during ioctls");
    kvm = open_kvm();
    vm = mte_vm(kvm);
    ram = memfd_ram(PAGES * PAGE, NULL);
    CHECK_EQ(set_region(vm, 0, 0, GPA, PAGES * PAGE, ram), 0, "slot 0 of %d pages", PAGES);
    CHECK(sigaction(SIGALRM, &sa, NULL) == 0, "SIGALRM handler without SA_RESTART");
    CHECK(setitimer(ITIMER_REAL, &every, NULL) == 0, "a timer every 200 us");
    for (int round = 0; round < 20; round++) {
        fill_tags(in, PAGES * TPP, (unsigned)round);
        int to = copy_tags(vm, GPA, PAGES * PAGE, in, KVM_ARM_TAGS_TO_GUEST);
        int from = copy_tags(vm, GPA, PAGES * PAGE, out, KVM_ARM_TAGS_FROM_GUEST);
        if (to != PAGES * PAGE || from != PAGES * PAGE || memcmp(in, out, PAGES * TPP))
            CHECK(0, "round %d: TO_GUEST %d, FROM_GUEST %d, tags %s", round, to, from,
                  memcmp(in, out, PAGES * TPP) ? "differ" : "equal");
        for (int i = 0; i < 200; i++) {
            if (ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE) != 1
                || ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_ONE_REG) < 0
                || ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
                CHECK(0, "round %d, small call %d", round, i);
        }
    }
    setitimer(ITIMER_REAL, &off, NULL);
    CHECK(1, "20 rounds of 2 bulk copies and 600 small calls: every answer right");
    CHECK(atomic_load(&signals) > 50, "%ld signals arrived meanwhile", atomic_load(&signals));
    CHECK_EQ(ioctl(kvm, KVM_GET_API_VERSION, 0), KVM_API_VERSION, "the system fd still answers");
    CHECK_EQ(close(vm), 0, "close the VM");
    CHECK_EQ(close(kvm), 0, "close the system fd");
    printf("PASS vmm_signals\n");
    return 0;
}
