/* The benchmark suite's C shim case (kvmtag/bench/roundtrip.py): KVM_CHECK_EXTENSION
 * (KVM_CAP_ARM_MTE) on a system fd, call by call, run under the shim against a real kvmtagd.
 *
 * usage: kvmtag-run bench_roundtrip CALLS [WARMUP]        WARMUP defaults to 100
 *
 * Opens /dev/kvm (which must be kvmtagd's: a socket), makes WARMUP untimed calls, then CALLS
 * calls each timed with CLOCK_MONOTONIC, and prints each call's time in nanoseconds, one per
 * line and nothing else, so the suite forms the same median and p99 as for its Python cases.
 * The times are kept in memory until the end: printing never lands inside a timed call.
 * Errors go to stderr, with exit status 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/kvm.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int count(const char *text, const char *what)
{
    char *end;
    long n = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || n < 0 || n > 100000000) {
        fprintf(stderr, "bench_roundtrip: %s must be a count, not \"%s\"\n", what, text);
        exit(2);
    }
    return (int)n;
}

static int check_extension(int kvm)
{
    int result = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE);
    if (result != 1) {
        fprintf(stderr, "bench_roundtrip: KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) = %d (%s)\n",
                result, result < 0 ? strerror(errno) : "expected 1");
        exit(1);
    }
    return result;
}

int main(int argc, char **argv)
{
    struct stat st;
    int64_t *times;
    int calls, warmup, kvm;

    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: kvmtag-run bench_roundtrip CALLS [WARMUP]\n");
        return 2;
    }
    calls = count(argv[1], "CALLS");
    warmup = argc > 2 ? count(argv[2], "WARMUP") : 100;
    times = calloc((size_t)calls + 1, sizeof *times);
    if (!times) {
        fprintf(stderr, "bench_roundtrip: out of memory\n");
        return 1;
    }
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        fprintf(stderr, "bench_roundtrip: open /dev/kvm: %s\n", strerror(errno));
        return 1;
    }
    if (fstat(kvm, &st) || !S_ISSOCK(st.st_mode)) {
        fprintf(stderr, "bench_roundtrip: /dev/kvm is not kvmtagd's (run under kvmtag-run)\n");
        return 1;
    }
    for (int i = 0; i < warmup; i++)
        check_extension(kvm);
    for (int i = 0; i < calls; i++) {
        int64_t start = now_ns();
        check_extension(kvm);
        times[i] = now_ns() - start;
    }
    close(kvm);
    for (int i = 0; i < calls; i++)
        printf("%lld\n", (long long)times[i]);
    free(times);
    return fflush(stdout) ? 1 : 0;
}
