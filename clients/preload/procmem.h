/* The calling process's own memory and mappings, as the shim sees them: kvmtag/procmem.py
 * in C (same rules, same order; read that module's docstring for the why of each step).
 *
 * copy_from_user and copy_to_user become kt_read_memory and kt_write_memory, done with
 * process_vm_readv / process_vm_writev on our own pid, so a bad pointer is a short count (the
 * kernel's EFAULT or partial result), never a SIGSEGV. kt_find_vmas answers the daemon's VMAS
 * callback from /proc/self/maps, with a descriptor for each shared file mapping it can find one
 * for (never for a private mapping).
 *
 * Nothing here goes through the shim's interposed functions: files are opened and descriptors
 * duplicated and closed with raw system calls.
 */
#ifndef KVMTAG_PROCMEM_H
#define KVMTAG_PROCMEM_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

/* Read [addr, addr+size) into buf; return how many leading bytes could be read (fewer than
 * size: the next byte faults). */
size_t kt_read_memory(uint64_t addr, void *buf, size_t size);

/* Write data at addr; return how many leading bytes were written (a hole, a PROT_READ or a
 * PROT_NONE page stops it there, as copy_to_user). */
size_t kt_write_memory(uint64_t addr, const void *data, size_t size);

/* One mapping as VMAS_DATA describes it, and the descriptor found for it (or -1). */
struct kt_found_vma {
    struct kt_vma vma;
    int fd; /* O_CLOEXEC, owned by the caller; KT_VMA_HAS_FD is set in vma.flags iff >= 0 */
};

/* The mappings intersecting [start, end), unclipped, in ascending order, in a malloc'd array
 * (free it, and close its fds). Returns 0, or -1 with errno (ENOMEM, or /proc unreadable). */
int kt_find_vmas(uint64_t start, uint64_t end, struct kt_found_vma **out, size_t *count);

/* Close the fds of vmas[0..count) and free the array. */
void kt_free_vmas(struct kt_found_vma *vmas, size_t count);

/* Raw system calls, past any interposer (ours included). */
int kt_sys_open(const char *path, int flags);
int kt_sys_close(int fd);
int kt_sys_fcntl(int fd, int cmd, long arg);

#endif
