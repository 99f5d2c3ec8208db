/* See guarded.h. One sigjmp_buf per thread: vCPUs copy on several threads at once, and SIGBUS
 * is delivered to the thread that faulted. */
#define _GNU_SOURCE
#include "guarded.h"

#include <setjmp.h>
#include <signal.h>
#include <string.h>

static __thread sigjmp_buf *volatile kt_jump;

static void kt_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)info;
    (void)context;
    sigjmp_buf *jump = kt_jump;
    if (jump != NULL) {
        kt_jump = NULL;
        siglongjmp(*jump, 1);
    }
    /* Not one of ours: die as SIGBUS would have killed us. */
    signal(sig, SIG_DFL);
    raise(sig);
}

int kt_guard_install(void)
{
    static volatile int installed;
    if (installed)
        return 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = kt_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, NULL) != 0)
        return -1;
    installed = 1;
    return 0;
}

int kt_guarded_copy(void *dst, const void *src, size_t n)
{
    sigjmp_buf jump;
    /* savemask = 1: the handler's blocked SIGBUS is unblocked again by siglongjmp. */
    if (sigsetjmp(jump, 1) != 0)
        return -1;
    kt_jump = &jump;
    memcpy(dst, src, n);
    kt_jump = NULL;
    return 0;
}
