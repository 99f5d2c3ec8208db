/* Copies that survive SIGBUS: for memory the VMM shares with kvmtagd (a memfd, a hugetlbfs
 * file) and may truncate under it at any moment. A truncated page raises SIGBUS on access; the
 * handler installed here turns that into a failed copy on the faulting thread instead of the
 * end of the daemon. */
#ifndef KVMTAG_GUARDED_H
#define KVMTAG_GUARDED_H

#include <stddef.h>

/* Install the SIGBUS handler (idempotent). A SIGBUS outside a guarded copy keeps its default
 * action. Returns 0, or -1 with errno set. */
int kt_guard_install(void);

/* memcpy(dst, src, n), or -1 if either side raised SIGBUS part-way (dst then holds an
 * unspecified prefix). kt_guard_install() must have been called. */
int kt_guarded_copy(void *dst, const void *src, size_t n);

#endif
