/* libkvmtag-preload.so: an unmodified, dynamically linked program talks to kvmtagd whenever
 * it opens /dev/kvm.
 *
 *     LD_PRELOAD=/path/to/libkvmtag-preload.so program args...     (or: kvmtag-run program ...)
 *
 * Opening the device path ($KVMTAG_DEVICE, default /dev/kvm) through open, open64, openat,
 * openat64 or their _2 fortify variants connects to kvmtagd's socket ($KVMTAG_SOCKET, else the
 * first of $XDG_RUNTIME_DIR/kvmtag/kvm.sock and /run/kvmtag/kvm.sock that exists) and returns
 * the connected socket: a real fd. ioctl on it, and on the VM and vCPU fds it leads to, is
 * forwarded with the kernel's semantics (docs/PROTOCOL.md); the Python client kvmtag/client.py
 * is the reference this follows. Every other path, fd and mapping goes to the real libc.
 *
 * State is per underlying socket (an "open file"), keyed by its (st_dev, st_ino); a fixed table
 * indexed by fd number marks the fds that refer to one, so the path of any other fd is one
 * load and a test: no lock, no allocation, no output. A marked fd is re-checked against its
 * socket's identity before use, so an fd number that was closed behind our back (a close that
 * did not come through here) and reused is not mistaken for kvmtag's.
 *
 * One request is in flight per open file (a mutex each); callbacks (READ, WRITE, VMAS, and
 * READ_WINDOW, WRITE_WINDOW through the shared window a VM connection gets in its handshake)
 * are served from this process's memory with process_vm_readv/writev on our own pid, so a bad
 * pointer is the kernel's EFAULT, never a crash. A signal never interrupts an exchange
 * half-way (EINTR is retried); anything that breaks the protocol turns into EIO for that open
 * file from then on, never into the death of the program.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "ioctls.h"
#include "procmem.h"
#include "wire.h"

#define EXPORT __attribute__((visibility("default")))
#define FDTAB_SIZE 8192             /* fd numbers below this are marked in a flat table */

/* --- the real functions ---------------------------------------------------------------------- */

static struct {
    int (*open)(const char *, int, ...);
    int (*open64)(const char *, int, ...);
    int (*openat)(int, const char *, int, ...);
    int (*openat64)(int, const char *, int, ...);
    int (*open_2)(const char *, int);
    int (*open64_2)(const char *, int);
    int (*openat_2)(int, const char *, int);
    int (*openat64_2)(int, const char *, int);
    int (*close)(int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    int (*ioctl)(int, unsigned long, ...);
    void *(*mmap)(void *, size_t, int, int, int, off_t);
    void *(*mmap64)(void *, size_t, int, int, int, off64_t);
} real;

static int debug;

static void resolve(void)
{
#define RESOLVE(field, symbol) \
    if (!real.field) *(void **)&real.field = dlsym(RTLD_NEXT, symbol)
    RESOLVE(open, "open");
    RESOLVE(open64, "open64");
    RESOLVE(openat, "openat");
    RESOLVE(openat64, "openat64");
    RESOLVE(open_2, "__open_2");
    RESOLVE(open64_2, "__open64_2");
    RESOLVE(openat_2, "__openat_2");
    RESOLVE(openat64_2, "__openat64_2");
    RESOLVE(close, "close");
    RESOLVE(dup, "dup");
    RESOLVE(dup2, "dup2");
    RESOLVE(dup3, "dup3");
    RESOLVE(fcntl, "fcntl");
    RESOLVE(fcntl64, "fcntl64");
    RESOLVE(ioctl, "ioctl");
    RESOLVE(mmap, "mmap");
    RESOLVE(mmap64, "mmap64");
#undef RESOLVE
}

/* Each wrapper calls through these: resolved by the constructor, or on first use by a call
 * that comes before it (another library's constructor). */
#define REAL(field) (__builtin_expect(real.field != NULL, 1) ? real.field : (resolve(), real.field))

/* Complain on stderr about protocol trouble, only with KVMTAG_DEBUG set. */
static void note(const char *what, const char *why)
{
    if (debug)
        dprintf(2, "kvmtag-preload[%d]: %s: %s\n", (int)getpid(), what, why);
}

/* --- open files ------------------------------------------------------------------------------ */

struct kfile {
    uint64_t dev, ino;      /* the socket's identity */
    int kind;               /* enum kt_fd_kind */
    pid_t pid;              /* the process that opened it: VM/vCPU fds answer EIO elsewhere */
    char *path;             /* system files: the socket, to reconnect after fork */
    /* Guarded by state_lock: */
    int nfds;               /* fd numbers of this process that refer to it */
    int users;              /* calls using it right now */
    int busy_fd;            /* the fd number an exchange in flight uses, or -1 */
    int deferred_fd;        /* that number, once closed by the program: closed after it */
    int inherited;          /* copied by fork: may be mid-update, so never freed */
    struct kfile *next;
    /* Guarded by lock (one request in flight): */
    pthread_mutex_t lock;
    pthread_t owner;
    int owned;
    int broken;             /* a protocol error happened: EIO from now on */
    uint32_t next_id;
    int run_fd;             /* vCPU: the memfd behind kvm_run, or -1 */
    struct kt_hello_reply hello;
    uint32_t max_message;   /* the daemon's limits, from its handshake */
    uint32_t window;
    struct kt_reader reader;/* received bytes and descriptors not yet decoded */
    uint8_t *sbuf;          /* READ_DATA's data (window bytes) */
    /* The shared window (1.1), mapped from the memfd HELLO_REPLY brought, or NULL. Only an
     * exchange (under lock) uses it; it is unmapped with the file, and not inherited by a
     * child (MADV_DONTFORK: a child's VM fds answer EIO and never use it). */
    uint8_t *shared;
    size_t shared_size;
};

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static struct kfile *_Atomic fdtab[FDTAB_SIZE];
static struct { int fd; struct kfile *file; } *overflow; /* fds >= FDTAB_SIZE */
static size_t noverflow, overflow_cap;
static atomic_size_t overflow_used;
static atomic_int ndeferred;            /* files with a deferred close */
static struct kfile *files;             /* every open file, for fork */
static atomic_int nfiles;               /* how many: 0 spares other fds any further look */

/* Is fd marked as one of ours? No lock: the fast path of every interposed call. */
static inline int fd_marked(int fd)
{
    if ((unsigned)fd < FDTAB_SIZE)
        return atomic_load_explicit(&fdtab[fd], memory_order_acquire) != NULL;
    return fd >= 0 && atomic_load_explicit(&overflow_used, memory_order_acquire) != 0;
}

static struct kfile *fd_get_locked(int fd)
{
    if (fd < 0)
        return NULL;
    if (fd < FDTAB_SIZE)
        return atomic_load_explicit(&fdtab[fd], memory_order_relaxed);
    for (size_t i = 0; i < noverflow; i++) {
        if (overflow[i].fd == fd)
            return overflow[i].file;
    }
    return NULL;
}

static void maybe_free_locked(struct kfile *f);

/* Mark fd as referring to f (NULL: unmark), forgetting what it referred to before. */
static void fd_put_locked(int fd, struct kfile *f)
{
    struct kfile *old = fd_get_locked(fd);

    if (fd < 0 || old == f)
        return;
    if (fd < FDTAB_SIZE) {
        atomic_store_explicit(&fdtab[fd], f, memory_order_release);
    } else {
        size_t i;
        for (i = 0; i < noverflow && overflow[i].fd != fd; i++)
            ;
        if (f && i == noverflow) {
            if (noverflow == overflow_cap) {
                size_t cap = overflow_cap ? 2 * overflow_cap : 16;
                void *grown = realloc(overflow, cap * sizeof *overflow);
                if (!grown)
                    return; /* this fd then behaves as a plain socket (ENOTTY) */
                overflow = grown;
                overflow_cap = cap;
            }
            noverflow++;
        }
        if (f) {
            overflow[i].fd = fd;
            overflow[i].file = f;
        } else if (i < noverflow) {
            overflow[i] = overflow[--noverflow];
        }
        atomic_store_explicit(&overflow_used, noverflow, memory_order_release);
    }
    if (f)
        f->nfds++;
    if (old) {
        old->nfds--;
        maybe_free_locked(old);
    }
}

static int same_socket(int fd, const struct kfile *f)
{
    struct stat st;
    return !fstat(fd, &st) && (uint64_t)st.st_dev == f->dev && (uint64_t)st.st_ino == f->ino;
}

/* The open file fd refers to, if it is still the socket that was marked; a stale mark (the
 * number was closed elsewhere and reused) is dropped. */
static struct kfile *fd_valid_locked(int fd)
{
    struct kfile *f = fd_get_locked(fd);
    if (f && !same_socket(fd, f)) {
        fd_put_locked(fd, NULL);
        f = NULL;
    }
    return f;
}

static void close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        kt_sys_close(fds[i]);
}

static void free_buffers(struct kfile *f)
{
    int strays[KT_MAX_MARKS * KT_MAX_FDS];
    close_fds(strays, kt_reader_take_fds(&f->reader, strays, KT_MAX_MARKS * KT_MAX_FDS));
    kt_reader_free(&f->reader);
    free(f->sbuf);
    f->sbuf = NULL;
}

static void unmap_window(struct kfile *f)
{
    if (f->shared) {
        munmap(f->shared, f->shared_size);
        f->shared = NULL;
        f->shared_size = 0;
    }
}

static void maybe_free_locked(struct kfile *f)
{
    struct kfile **link;

    if (f->nfds > 0 || f->users > 0 || f->busy_fd >= 0)
        return;
    if (f->run_fd >= 0) {
        kt_sys_close(f->run_fd);
        f->run_fd = -1;
    }
    unmap_window(f);
    if (f->inherited)
        return; /* its memory may have been mid-update when the parent forked: keep it */
    for (link = &files; *link && *link != f; link = &(*link)->next)
        ;
    if (*link) {
        *link = f->next;
        atomic_fetch_sub(&nfiles, 1);
    }
    free_buffers(f);
    pthread_mutex_destroy(&f->lock);
    free(f->path);
    free(f);
}

static struct kfile *new_file(int sock, int kind, const char *path)
{
    struct kfile *f = calloc(1, sizeof *f);
    struct stat st;

    if (!f || fstat(sock, &st)) {
        free(f);
        errno = ENOMEM;
        return NULL;
    }
    if (path && !(f->path = strdup(path))) {
        free(f);
        errno = ENOMEM;
        return NULL;
    }
    f->dev = st.st_dev;
    f->ino = st.st_ino;
    f->kind = kind;
    f->pid = getpid();
    f->busy_fd = f->deferred_fd = f->run_fd = -1;
    f->next_id = 1;
    f->max_message = KT_MAX_MESSAGE; /* until the handshake tells */
    f->window = KT_WINDOW;
    kt_reader_init(&f->reader, KT_ROLE_CLIENT, KT_MAX_MESSAGE);
    pthread_mutex_init(&f->lock, NULL);
    return f;
}

static void discard_file(struct kfile *f)
{
    if (f->run_fd >= 0)
        kt_sys_close(f->run_fd);
    unmap_window(f);
    free_buffers(f);
    pthread_mutex_destroy(&f->lock);
    free(f->path);
    free(f);
}

/* Make f known with fd as its first number. */
static void register_file(struct kfile *f, int fd)
{
    pthread_mutex_lock(&state_lock);
    f->next = files;
    files = f;
    atomic_fetch_add(&nfiles, 1);
    fd_put_locked(fd, f);
    pthread_mutex_unlock(&state_lock);
}

/* Take a reference to the open file fd refers to (NULL: not ours). */
static struct kfile *acquire(int fd)
{
    struct kfile *f;

    pthread_mutex_lock(&state_lock);
    f = fd_valid_locked(fd);
    if (f)
        f->users++;
    pthread_mutex_unlock(&state_lock);
    return f;
}

static void release(struct kfile *f)
{
    int saved = errno;
    pthread_mutex_lock(&state_lock);
    f->users--;
    maybe_free_locked(f);
    pthread_mutex_unlock(&state_lock);
    errno = saved;
}

/* --- frames on a connection ------------------------------------------------------------------ */

/* Wait until fd is ready (the program may have made the socket non-blocking). */
static void wait_for(int fd, short events)
{
    struct pollfd p = { fd, events, 0 };
    while (poll(&p, 1, -1) < 0 && errno == EINTR)
        ;
}

/* Send a whole frame: `head` (header and fixed body), then data, with fds alongside its first
 * byte. Retries EINTR: a signal never leaves half a frame on the stream. 0, or -1. */
static int send_frame(int fd, const uint8_t *head, size_t head_len, const void *data,
                      size_t data_len, const int *fds, int nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * KT_MAX_FDS)];
    } control;
    struct iovec iov[2] = { { (void *)head, head_len }, { (void *)data, data_len } };
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = data_len ? 2 : 1 };

    if (nfds > 0) {
        struct cmsghdr *c;
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    while (msg.msg_iovlen) {
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                wait_for(fd, POLLOUT);
                continue;
            }
            return -1;
        }
        msg.msg_control = NULL; /* the descriptors went with the first byte */
        msg.msg_controllen = 0;
        while (msg.msg_iovlen && (size_t)n >= msg.msg_iov->iov_len) {
            n -= (ssize_t)msg.msg_iov->iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen) {
            msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + n;
            msg.msg_iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static int send_event(int fd, const struct kt_event *ev, const int *fds)
{
    uint8_t head[KT_HEADER_SIZE + KT_HELLO_REPLY_SIZE];
    size_t n = kt_encode_head(ev, head);
    if (!n) {
        errno = EPROTO;
        return -1;
    }
    return send_frame(fd, head, n, ev->data, ev->data_len, fds, ev->nfds);
}

/* The next frame from the daemon. Its descriptors are moved to fds[0..ev->nfds); its data
 * points into the reader's buffer until the next call. 0, or -1 with *why (a violation or a
 * dead peer). */
static int receive_event(struct kfile *f, int fd, struct kt_event *ev, int *fds, const char **why)
{
    for (;;) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * KT_MAX_FDS)];
        } control;
        int got[KT_MAX_FDS], ngot = 0;
        size_t room;
        int rc = kt_reader_next(&f->reader, ev, fds, why);

        if (rc == KT_OK)
            return 0;
        if (rc == KT_VIOLATION)
            return -1;
        uint8_t *space = kt_reader_space(&f->reader, &room);
        if (!space) {
            *why = "out of memory for a frame";
            return -1;
        }
        struct iovec iov = { space, room };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                              .msg_control = control.buf, .msg_controllen = sizeof control.buf };
        ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                wait_for(fd, POLLIN);
                continue;
            }
            *why = strerror(errno);
            return -1;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int these[KT_MAX_FDS];
            if (count > KT_MAX_FDS)
                count = KT_MAX_FDS; /* no more fit the control buffer: MSG_CTRUNC says so */
            memcpy(these, CMSG_DATA(c), sizeof(int) * (size_t)count);
            for (int i = 0; i < count; i++) {
                if (ngot < KT_MAX_FDS)
                    got[ngot++] = these[i];
                else
                    kt_sys_close(these[i]);
            }
        }
        if (msg.msg_flags & MSG_CTRUNC) {
            close_fds(got, ngot);
            *why = "descriptors truncated";
            return -1;
        }
        if (n == 0) {
            close_fds(got, ngot);
            *why = "kvmtagd closed the connection";
            return -1;
        }
        if (kt_reader_received(&f->reader, (size_t)n, got, ngot, why) != KT_OK)
            return -1;
    }
}

/* A protocol error on f: EIO now and from now on. The stream is out of step, so it is shut
 * down too: the daemon then closes its end instead of waiting for an answer. */
static void break_file(struct kfile *f, int fd, const char *why)
{
    int strays[KT_MAX_MARKS * KT_MAX_FDS];

    note("protocol error, the connection now answers EIO", why);
    f->broken = 1;
    close_fds(strays, kt_reader_take_fds(&f->reader, strays, KT_MAX_MARKS * KT_MAX_FDS));
    shutdown(fd, SHUT_RDWR);
}

/* --- callbacks: the daemon reaches our memory ------------------------------------------------ */

static int serve_read(struct kfile *f, int fd, const struct kt_event *ask, const char **why)
{
    struct kt_event answer = { .type = KT_READ_DATA, .id = ask->id };
    uint8_t head[KT_HEADER_SIZE];

    if (ask->u.read.size > f->window) {
        *why = "READ larger than the window the daemon announced";
        return -1;
    }
    if (!f->sbuf && !(f->sbuf = malloc(f->window))) {
        *why = "out of memory for READ_DATA";
        return -1;
    }
    answer.data = f->sbuf;
    answer.data_len = kt_read_memory(ask->u.read.addr, f->sbuf, ask->u.read.size);
    if (kt_encode_head(&answer, head) != KT_HEADER_SIZE
        || send_frame(fd, head, KT_HEADER_SIZE, answer.data, answer.data_len, NULL, 0)) {
        *why = "could not send READ_DATA";
        return -1;
    }
    return 0;
}

static int serve_write(int fd, const struct kt_event *ask, const char **why)
{
    struct kt_event answer = { .type = KT_WRITE_DONE, .id = ask->id };
    answer.u.write_done.written = kt_write_memory(ask->u.write.addr, ask->data, ask->data_len);
    if (send_event(fd, &answer, NULL)) {
        *why = "could not send WRITE_DONE";
        return -1;
    }
    return 0;
}

static int serve_vmas(struct kfile *f, int fd, const struct kt_event *ask, const char **why)
{
    struct kt_event answer = { .type = KT_VMAS_DATA, .id = ask->id };
    struct kt_found_vma *vmas;
    size_t count;
    uint8_t *records;
    int fds[KT_MAX_FDS], nfds = 0, rc = -1;

    if (kt_find_vmas(ask->u.vmas.start, ask->u.vmas.end, &vmas, &count)) {
        *why = "cannot read /proc/self/maps";
        return -1;
    }
    if (count > (f->max_message - KT_HEADER_SIZE - KT_VMAS_DATA_SIZE) / KT_VMA_RECORD_SIZE) {
        *why = "more mappings than one VMAS_DATA frame holds";
        goto out;
    }
    records = malloc(count * KT_VMA_RECORD_SIZE + 1);
    if (!records) {
        *why = "out of memory for VMAS_DATA";
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        /* At most KT_MAX_FDS descriptors fit in one frame: mappings beyond go without one
         * and are tags-only for the daemon (docs/PROTOCOL.md). */
        if (vmas[i].fd >= 0 && nfds == KT_MAX_FDS) {
            kt_sys_close(vmas[i].fd);
            vmas[i].fd = -1;
            vmas[i].vma.flags &= ~KT_VMA_HAS_FD;
        }
        if (vmas[i].fd >= 0)
            fds[nfds++] = vmas[i].fd;
        kt_encode_vma(records + i * KT_VMA_RECORD_SIZE, &vmas[i].vma);
    }
    answer.u.vmas_data.count = (uint32_t)count;
    answer.nfds = (uint16_t)nfds;
    answer.data = records;
    answer.data_len = count * KT_VMA_RECORD_SIZE;
    rc = send_event(fd, &answer, fds);
    if (rc)
        *why = "could not send VMAS_DATA";
    free(records);
out:
    kt_free_vmas(vmas, count);
    return rc;
}

/* READ_WINDOW: [addr, addr+size) of our memory into the window's first bytes; WRITE_WINDOW:
 * the window's first size bytes to addr. Both answer WINDOW_DONE with the prefix copied. The
 * window is only ever touched by process_vm_readv/writev, like the memory at addr. */
static int serve_window(struct kfile *f, int fd, const struct kt_event *ask, const char **why)
{
    struct kt_event answer = { .type = KT_WINDOW_DONE, .id = ask->id };

    if (!f->shared) {
        *why = "READ_WINDOW or WRITE_WINDOW on a connection without a shared window";
        return -1;
    }
    if (ask->u.window.size > f->shared_size) {
        *why = "READ_WINDOW or WRITE_WINDOW larger than the shared window";
        return -1;
    }
    if (ask->type == KT_READ_WINDOW)
        answer.u.window_done.count = kt_read_memory(ask->u.window.addr, f->shared,
                                                    (size_t)ask->u.window.size);
    else
        answer.u.window_done.count = kt_write_memory(ask->u.window.addr, f->shared,
                                                     (size_t)ask->u.window.size);
    if (send_event(fd, &answer, NULL)) {
        *why = "could not send WINDOW_DONE";
        return -1;
    }
    return 0;
}

/* Send one request and serve its callbacks until its answer comes; the caller holds f->lock.
 * Returns 0 with *answer (of type `expect`) and its descriptors, or -1 after break_file. */
static int exchange(struct kfile *f, int fd, const struct kt_event *request, unsigned expect,
                    struct kt_event *answer, int *fds)
{
    const char *why = "";

    if (send_event(fd, request, NULL)) {
        why = "could not send the request";
        goto broken;
    }
    for (;;) {
        if (receive_event(f, fd, answer, fds, &why))
            goto broken;
        if (answer->id != request->id) {
            close_fds(fds, answer->nfds);
            why = "an answer for another request";
            goto broken;
        }
        switch (answer->type) {
        case KT_READ:
            if (serve_read(f, fd, answer, &why))
                goto broken;
            continue;
        case KT_WRITE:
            if (serve_write(fd, answer, &why))
                goto broken;
            continue;
        case KT_VMAS:
            if (serve_vmas(f, fd, answer, &why))
                goto broken;
            continue;
        case KT_READ_WINDOW:
        case KT_WRITE_WINDOW:
            if (serve_window(f, fd, answer, &why))
                goto broken;
            continue;
        case KT_ERROR:
            why = "kvmtagd reported a protocol error";
            if (debug)
                dprintf(2, "kvmtag-preload: kvmtagd: %.*s\n", (int)answer->data_len,
                        (const char *)answer->data);
            goto broken;
        default:
            if (answer->type != expect) {
                close_fds(fds, answer->nfds);
                why = "an answer of the wrong type";
                goto broken;
            }
            if (f->reader.nmarks || kt_reader_buffered(&f->reader)) {
                /* With one request in flight nothing may follow its answer. */
                close_fds(fds, answer->nfds);
                why = "bytes or descriptors after the answer";
                goto broken;
            }
            return 0;
        }
    }
broken:
    break_file(f, fd, why);
    errno = EIO;
    return -1;
}

/* Map the shared window HELLO_REPLY brought: a memfd of `window` bytes (kvmtagd gives one to
 * VM connections). The descriptor is the caller's to close. 0, or -1 with *why. */
static int map_window(struct kfile *f, int memfd, uint32_t window, const char **why)
{
    struct stat st;
    void *p;

    if (!window || window > KT_MAX_MESSAGE_LIMIT) {
        *why = "a shared window of no size, or larger than the shim allows";
        return -1;
    }
    /* Smaller than announced, the window's tail would fault: copies would come up short and
     * look like faults in the program's memory. */
    if (fstat(memfd, &st) || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < window) {
        *why = "the shared window is not a file of `window` bytes";
        return -1;
    }
    p = REAL(mmap)(NULL, window, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (p == MAP_FAILED) {
        *why = "the shared window cannot be mapped";
        return -1;
    }
    /* A child never uses it (its VM fds answer EIO) and must not reach the parent's copies;
     * after_fork_in_child forgets it. (Should madvise fail, the child merely keeps an unused
     * mapping.) */
    madvise(p, window, MADV_DONTFORK);
    f->shared = p;
    f->shared_size = window;
    return 0;
}

/* HELLO on a new connection, asking for the shared window; 0, or -1 with errno (EIO, or the
 * daemon's refusal). */
static int handshake(struct kfile *f, int fd)
{
    struct kt_event hello = { .type = KT_HELLO, .id = f->next_id++ };
    struct kt_event answer;
    int fds[KT_MAX_FDS];
    const char *why = NULL;

    hello.u.hello.major = KT_VERSION_MAJOR;
    hello.u.hello.minor = KT_VERSION_MINOR;
    hello.u.hello.flags = KT_HELLO_SHARED_WINDOW;
    if (exchange(f, fd, &hello, KT_HELLO_REPLY, &answer, fds))
        return -1;
    if (answer.nfds > 1 || (answer.nfds && answer.u.hello_reply.err))
        why = "a handshake with descriptors other than one shared window";
    else if (answer.nfds)
        map_window(f, fds[0], answer.u.hello_reply.window, &why);
    close_fds(fds, answer.nfds); /* the mapping keeps the window */
    if (why) {
        break_file(f, fd, why);
        errno = EIO;
        return -1;
    }
    if (answer.u.hello_reply.err) {
        errno = answer.u.hello_reply.err < 4096 ? (int)answer.u.hello_reply.err : EIO;
        return -1;
    }
    f->hello = answer.u.hello_reply;
    /* The daemon's own limits from now on, bounded: a frame must fit what we allocate. */
    f->max_message = f->hello.max_message < KT_MAX_MESSAGE_LIMIT ? f->hello.max_message
                                                                 : KT_MAX_MESSAGE_LIMIT;
    if (f->max_message < KT_HEADER_SIZE + KT_HELLO_REPLY_SIZE)
        f->max_message = KT_HEADER_SIZE + KT_HELLO_REPLY_SIZE;
    f->window = f->hello.window < f->max_message - KT_HEADER_SIZE ? f->hello.window
                                                                  : f->max_message - KT_HEADER_SIZE;
    f->reader.max_message = f->max_message;
    return 0;
}

/* CREATE_VM / CREATE_VCPU: the new connection (and a vCPU's kvm_run memfd), handshaken. */
static int adopt(struct kfile *parent, int *fds, int nfds)
{
    int kind = parent->kind == KT_FD_SYSTEM ? KT_FD_VM : KT_FD_VCPU;
    int fd = fds[0], run_fd = kind == KT_FD_VCPU && nfds > 1 ? fds[1] : -1;
    struct kfile *f;

    close_fds(fds + (run_fd >= 0 ? 2 : 1), nfds - (run_fd >= 0 ? 2 : 1));
    f = new_file(fd, kind, NULL);
    if (!f) {
        int saved = errno;
        close_fds(fds, run_fd >= 0 ? 2 : 1);
        errno = saved;
        return -1;
    }
    f->run_fd = run_fd;
    if (handshake(f, fd)) {
        int saved = errno;
        discard_file(f);
        kt_sys_close(fd);
        errno = saved;
        return -1;
    }
    register_file(f, fd);
    return fd;
}

/* An ioctl on one of our fds, with f->lock held. */
static int forward(struct kfile *f, int fd, uint32_t request, void *arg)
{
    const struct kt_ioctl *spec = kt_ioctl_spec(request);
    struct kt_event ioctl = { .type = KT_IOCTL };
    struct kt_event reply;
    uint8_t inline_struct[128];
    int fds[KT_MAX_FDS];

    if (f->broken) {
        errno = EIO;
        return -1;
    }
    ioctl.id = f->next_id++;
    ioctl.u.ioctl.request = request;
    ioctl.u.ioctl.arg = (uint64_t)(uintptr_t)arg;
    /* A struct the kernel only reads travels inline when it is readable: one round trip
     * fewer than a READ callback, same bytes. If it faults, the address goes instead and the
     * daemon finds the fault in the kernel's order (EINVAL for an unknown ioctl comes first). */
    if (spec && spec->arg == KT_ARG_IN && spec->size <= sizeof inline_struct
        && kt_read_memory(ioctl.u.ioctl.arg, inline_struct, spec->size) == spec->size) {
        ioctl.u.ioctl.flags = KT_IOCTL_INLINE;
        ioctl.u.ioctl.arg = 0;
        ioctl.data = inline_struct;
        ioctl.data_len = spec->size;
    }
    if (exchange(f, fd, &ioctl, KT_REPLY, &reply, fds))
        return -1;
    if (reply.u.reply.err) {
        close_fds(fds, reply.nfds);
        errno = reply.u.reply.err < 4096 ? (int)reply.u.reply.err : EIO;
        return -1;
    }
    if (spec && spec->creates) {
        if (!reply.nfds) {
            break_file(f, fd, "a new fd's reply without its descriptor");
            errno = EIO;
            return -1;
        }
        return adopt(f, fds, reply.nfds);
    }
    close_fds(fds, reply.nfds);
    return (int)reply.u.reply.result; /* glibc's ioctl returns int, as the kernel's does here */
}

static int emulated_ioctl(int fd, unsigned long request, void *arg)
{
    struct kfile *f = acquire(fd);
    int rc, saved, cancel;

    if (!f)
        return REAL(ioctl)(fd, request, arg);
    if (f->pid != getpid()) {
        release(f);
        errno = EIO; /* a VM or vCPU fd inherited over fork: KVM answers EIO */
        return -1;
    }
    if (f->owned && pthread_equal(f->owner, pthread_self())) {
        release(f);
        errno = EDEADLK; /* from a signal handler that interrupted this thread's exchange */
        return -1;
    }
    /* A cancelled thread would leave the stream half-way and the lock held. */
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
    pthread_mutex_lock(&f->lock);
    f->owner = pthread_self();
    f->owned = 1;
    pthread_mutex_lock(&state_lock);
    if (fd_get_locked(fd) != f) {
        /* fd was closed while this call waited for the lock: it comes after the close. */
        pthread_mutex_unlock(&state_lock);
        rc = -1;
        saved = EBADF;
    } else {
        f->busy_fd = fd;
        pthread_mutex_unlock(&state_lock);
        rc = forward(f, fd, (uint32_t)request, arg);
        saved = errno;
        pthread_mutex_lock(&state_lock);
        f->busy_fd = -1;
        if (f->deferred_fd >= 0) {
            REAL(close)(f->deferred_fd);
            f->deferred_fd = -1;
            atomic_fetch_sub(&ndeferred, 1);
        }
        pthread_mutex_unlock(&state_lock);
    }
    f->owned = 0;
    pthread_mutex_unlock(&f->lock);
    release(f);
    pthread_setcancelstate(cancel, NULL);
    errno = saved;
    return rc;
}

/* --- open ------------------------------------------------------------------------------------ */

static const char *device_path(void)
{
    const char *dev = getenv("KVMTAG_DEVICE");
    return dev && *dev ? dev : "/dev/kvm";
}

/* Does (dirfd, path) name the device? An absolute path is compared as a string; a relative
 * one is resolved against the working directory (AT_FDCWD) or dirfd's path, and only when it
 * could be the device's tail, so other opens cost no system call. */
static int is_device(int dirfd, const char *path)
{
    const char *dev = device_path();
    size_t plen, dlen, dir_len;
    char dir[PATH_MAX];

    if (!path)
        return 0;
    if (path[0] == '/')
        return !strcmp(path, dev);
    plen = strlen(path);
    dlen = strlen(dev);
    if (!plen || plen >= dlen || dev[0] != '/' || dev[dlen - plen - 1] != '/'
        || strcmp(dev + dlen - plen, path))
        return 0;
    dir_len = dlen - plen - 1; /* dev[0..dir_len) is the directory; "" means "/" */
    if (dirfd == AT_FDCWD) {
        if (!getcwd(dir, sizeof dir))
            return 0;
    } else {
        char link[64];
        ssize_t n;
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        n = readlink(link, dir, sizeof dir - 1);
        if (n <= 0)
            return 0;
        dir[n] = 0;
    }
    if (!dir_len)
        return !strcmp(dir, "/");
    return strlen(dir) == dir_len && !memcmp(dir, dev, dir_len);
}

/* $KVMTAG_SOCKET, else the first of $XDG_RUNTIME_DIR/kvmtag/kvm.sock and
 * /run/kvmtag/kvm.sock that exists. 0, or -1 with ENOENT. */
static int socket_path(char *out, size_t size)
{
    const char *env = getenv("KVMTAG_SOCKET");
    struct stat st;

    if (env && *env) {
        snprintf(out, size, "%s", env);
        return 0;
    }
    env = getenv("XDG_RUNTIME_DIR");
    if (env && *env) {
        snprintf(out, size, "%s/kvmtag/kvm.sock", env);
        if (!stat(out, &st))
            return 0;
    }
    snprintf(out, size, "/run/kvmtag/kvm.sock");
    if (!stat(out, &st))
        return 0;
    errno = ENOENT;
    return -1;
}

/* A connected, handshaken socket to kvmtagd at path, and its open file. */
static int connect_daemon(const char *path, int cloexec, struct kfile **out)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    struct kfile *f;
    int fd, saved;

    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | (cloexec ? SOCK_CLOEXEC : 0), 0);
    if (fd < 0)
        return -1;
    while (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (errno == EINTR)
            continue; /* the connection goes on in the background: wait for it */
        if (errno == EISCONN)
            break;
        if (errno == EALREADY || errno == EINPROGRESS) {
            wait_for(fd, POLLOUT);
            continue;
        }
        goto fail;
    }
    f = new_file(fd, KT_FD_SYSTEM, path);
    if (!f)
        goto fail;
    if (handshake(f, fd)) {
        saved = errno;
        discard_file(f);
        errno = saved;
        goto fail;
    }
    *out = f;
    return fd;
fail:
    saved = errno;
    kt_sys_close(fd);
    errno = saved;
    return -1;
}

/* open(device): connect to kvmtagd; the connected socket is the new fd. */
static int open_device(int flags)
{
    char path[PATH_MAX];
    struct kfile *f;
    int fd;

    if (socket_path(path, sizeof path))
        return -1;
    fd = connect_daemon(path, flags & O_CLOEXEC, &f);
    if (fd < 0)
        return -1;
    register_file(f, fd);
    return fd;
}

#define MODE_ARG(flags, last)                      \
    int mode = 0;                                  \
    if (__OPEN_NEEDS_MODE(flags)) {                \
        va_list ap;                                \
        va_start(ap, last);                        \
        mode = va_arg(ap, int);                    \
        va_end(ap);                                \
    }

EXPORT int open(const char *path, int flags, ...)
{
    MODE_ARG(flags, flags);
    if (is_device(AT_FDCWD, path))
        return open_device(flags);
    return REAL(open)(path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    MODE_ARG(flags, flags);
    if (is_device(AT_FDCWD, path))
        return open_device(flags);
    return REAL(open64)(path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    MODE_ARG(flags, flags);
    if (is_device(dirfd, path))
        return open_device(flags);
    return REAL(openat)(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    MODE_ARG(flags, flags);
    if (is_device(dirfd, path))
        return open_device(flags);
    return REAL(openat64)(dirfd, path, flags, mode);
}

EXPORT int __open_2(const char *path, int flags)
{
    if (is_device(AT_FDCWD, path))
        return open_device(flags);
    return REAL(open_2)(path, flags);
}

EXPORT int __open64_2(const char *path, int flags)
{
    if (is_device(AT_FDCWD, path))
        return open_device(flags);
    return REAL(open64_2)(path, flags);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    if (is_device(dirfd, path))
        return open_device(flags);
    return REAL(openat_2)(dirfd, path, flags);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    if (is_device(dirfd, path))
        return open_device(flags);
    return REAL(openat64_2)(dirfd, path, flags);
}

/* --- ioctl ------------------------------------------------------------------------------------ */

/* An fd the shim never saw made (a descriptor passed to ourselves with SCM_RIGHTS, a dup by a
 * path not interposed) that refers to one of our sockets: mark it, as the state is per socket.
 * Only asked after the real ioctl said ENOTTY, which a socket answers to KVM's numbers without
 * doing anything. */
static int adopt_unmarked(int fd)
{
    struct stat st;
    int found = 0;

    if (fstat(fd, &st) || !S_ISSOCK(st.st_mode))
        return 0;
    pthread_mutex_lock(&state_lock);
    for (struct kfile *f = files; f; f = f->next) {
        if (f->dev == (uint64_t)st.st_dev && f->ino == (uint64_t)st.st_ino && f->nfds > 0) {
            fd_put_locked(fd, f);
            found = fd_get_locked(fd) == f;
            break;
        }
    }
    pthread_mutex_unlock(&state_lock);
    return found;
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    int rc;

    va_start(ap, request);
    arg = va_arg(ap, void *); /* as glibc: the kernel takes the argument as an unsigned long */
    va_end(ap);
    if (__builtin_expect(fd_marked(fd), 0))
        return emulated_ioctl(fd, request, arg);
    rc = REAL(ioctl)(fd, request, arg);
    if (__builtin_expect(rc == -1 && errno == ENOTTY
                         && atomic_load_explicit(&nfiles, memory_order_relaxed), 0)
        && adopt_unmarked(fd))
        return emulated_ioctl(fd, request, arg);
    return rc;
}

/* --- close, dup, dup2, dup3, fcntl ----------------------------------------------------------- */

/* Is fd a number the program closed while an exchange was using it? */
static int fd_deferred_locked(int fd)
{
    for (struct kfile *f = files; f; f = f->next) {
        if (f->deferred_fd == fd)
            return 1;
    }
    return 0;
}

EXPORT int close(int fd)
{
    struct kfile *f;
    int rc, saved;

    if (__builtin_expect(!fd_marked(fd) && !atomic_load_explicit(&ndeferred, memory_order_relaxed), 1))
        return REAL(close)(fd);
    pthread_mutex_lock(&state_lock);
    f = fd_get_locked(fd);
    if (!f && fd_deferred_locked(fd)) {
        pthread_mutex_unlock(&state_lock);
        errno = EBADF; /* closed already: its number is only waiting for an exchange to end */
        return -1;
    }
    if (f && f->busy_fd == fd) {
        /* An exchange in flight on this very number (another thread's ioctl): the file
         * lives until it ends, as in the kernel, so the number is released then. */
        fd_put_locked(fd, NULL);
        f->deferred_fd = fd;
        atomic_fetch_add(&ndeferred, 1);
        pthread_mutex_unlock(&state_lock);
        return 0;
    }
    rc = REAL(close)(fd);
    saved = errno;
    if (f)
        fd_put_locked(fd, NULL); /* Linux releases the number whatever close returns */
    pthread_mutex_unlock(&state_lock);
    errno = saved;
    return rc;
}

EXPORT int dup(int fd)
{
    struct kfile *f;
    int rc, saved;

    if (__builtin_expect(!fd_marked(fd), 1))
        return REAL(dup)(fd);
    pthread_mutex_lock(&state_lock);
    f = fd_valid_locked(fd);
    rc = REAL(dup)(fd);
    saved = errno;
    if (rc >= 0 && f)
        fd_put_locked(rc, f);
    pthread_mutex_unlock(&state_lock);
    errno = saved;
    return rc;
}

/* Is fd the number an exchange in flight uses (marked or closed-and-deferred)? */
static int fd_busy_locked(int fd)
{
    for (struct kfile *f = files; f; f = f->next) {
        if (f->busy_fd == fd)
            return 1;
    }
    return 0;
}

static int dup_onto(int oldfd, int newfd, int flags, int three)
{
    struct kfile *f;
    int rc, saved;

    if (__builtin_expect(!fd_marked(oldfd) && !fd_marked(newfd)
                         && !atomic_load_explicit(&ndeferred, memory_order_relaxed), 1)
        || oldfd == newfd)
        return three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
    pthread_mutex_lock(&state_lock);
    if (fd_busy_locked(newfd)) {
        /* Replacing the number another thread's exchange is using would send its frames to
         * another file: Linux's dup2 may answer EBUSY in a race with open, and so do we. */
        pthread_mutex_unlock(&state_lock);
        errno = EBUSY;
        return -1;
    }
    f = fd_valid_locked(oldfd);
    rc = three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
    saved = errno;
    if (rc >= 0)
        fd_put_locked(newfd, f);
    pthread_mutex_unlock(&state_lock);
    errno = saved;
    return rc;
}

EXPORT int dup2(int oldfd, int newfd)
{
    return dup_onto(oldfd, newfd, 0, 0);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    return dup_onto(oldfd, newfd, flags, 1);
}

static int fcntl_dupfd(int (*fn)(int, int, ...), int fd, int cmd, void *arg)
{
    struct kfile *f;
    int rc, saved;

    pthread_mutex_lock(&state_lock);
    f = fd_valid_locked(fd);
    rc = fn(fd, cmd, arg);
    saved = errno;
    if (rc >= 0 && f)
        fd_put_locked(rc, f);
    pthread_mutex_unlock(&state_lock);
    errno = saved;
    return rc;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *); /* as glibc: an int or a pointer, passed on as it came */
    va_end(ap);
    if (__builtin_expect((cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC) || !fd_marked(fd), 1))
        return REAL(fcntl)(fd, cmd, arg);
    return fcntl_dupfd(REAL(fcntl), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    int (*fn)(int, int, ...) = REAL(fcntl64) ? real.fcntl64 : REAL(fcntl);
    va_list ap;
    void *arg;

    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (__builtin_expect((cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC) || !fd_marked(fd), 1))
        return fn(fd, cmd, arg);
    return fcntl_dupfd(fn, fd, cmd, arg);
}

/* --- mmap ------------------------------------------------------------------------------------ */

/* mmap of a vCPU fd maps its kvm_run area: the memfd the daemon sent with CREATE_VCPU and
 * updates in place. The program's flags are kept: a MAP_PRIVATE mapping of a memfd behaves as
 * one of KVM's vCPU fd does (reads see the shared page until the program writes to it). */
static int mmap_target(int fd, int flags, struct kfile **held)
{
    struct kfile *f;

    *held = NULL;
    if (__builtin_expect(fd < 0 || (flags & MAP_ANONYMOUS) || !fd_marked(fd), 1))
        return fd;
    f = acquire(fd);
    if (!f)
        return fd;
    *held = f;
    return f->kind == KT_FD_VCPU && f->run_fd >= 0 ? f->run_fd : fd;
}

EXPORT void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    struct kfile *held;
    void *p;

    /* dlsym itself may map memory before anything is resolved: go to the kernel then. */
    if (__builtin_expect(!real.mmap, 0))
        return (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
    p = real.mmap(addr, length, prot, flags, mmap_target(fd, flags, &held), offset);
    if (held)
        release(held);
    return p;
}

EXPORT void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off64_t offset)
{
    struct kfile *held;
    void *p;

    if (__builtin_expect(!real.mmap64, 0))
        return (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
    p = real.mmap64(addr, length, prot, flags, mmap_target(fd, flags, &held), offset);
    if (held)
        release(held);
    return p;
}

/* --- fork -------------------------------------------------------------------------------------- */

static void before_fork(void)
{
    pthread_mutex_lock(&state_lock);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&state_lock);
}

/* The fd numbers (below FDTAB_SIZE and in the overflow list) that refer to f. */
static size_t numbers_of(const struct kfile *f, int *out, size_t max)
{
    size_t n = 0;
    for (int fd = 0; fd < FDTAB_SIZE && n < max; fd++) {
        if (atomic_load_explicit(&fdtab[fd], memory_order_relaxed) == f)
            out[n++] = fd;
    }
    for (size_t i = 0; i < noverflow && n < max; i++) {
        if (overflow[i].file == f)
            out[n++] = overflow[i].fd;
    }
    return n;
}

/* The child must not share a stream with its parent: its system fds are reconnected onto the
 * same numbers (close-on-exec kept per number); its VM and vCPU fds keep the parent's pid and
 * answer EIO without touching the socket. Locks held by other threads at fork are reset. */
static void after_fork_in_child(void)
{
    struct kfile *inherited = files;

    pthread_mutex_init(&state_lock, NULL);
    pthread_mutex_lock(&state_lock);
    for (struct kfile *f = inherited; f; f = f->next) {
        pthread_mutex_init(&f->lock, NULL);
        f->owned = 0;
        f->inherited = 1;
        f->shared = NULL; /* MADV_DONTFORK: not mapped here (and its address may be reused) */
        f->shared_size = 0;
        f->users = 0;
        f->busy_fd = -1;
        if (f->deferred_fd >= 0) {
            kt_sys_close(f->deferred_fd);
            f->deferred_fd = -1;
        }
    }
    atomic_store(&ndeferred, 0);
    for (struct kfile *f = inherited; f; f = f->next) {
        int numbers[256];
        size_t n;
        struct kfile *fresh;
        int fd;

        if (f->kind != KT_FD_SYSTEM || !f->path || f->nfds <= 0)
            continue;
        n = numbers_of(f, numbers, sizeof numbers / sizeof numbers[0]);
        if (!n)
            continue;
        fd = connect_daemon(f->path, 1, &fresh);
        if (fd < 0) {
            f->broken = 1; /* kvmtagd is gone: these fds answer EIO */
            continue;
        }
        for (size_t i = 0; i < n; i++) {
            int fdflags = kt_sys_fcntl(numbers[i], F_GETFD, 0);
            syscall(SYS_dup3, fd, numbers[i], fdflags > 0 && (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0);
            fd_put_locked(numbers[i], fresh);
        }
        kt_sys_close(fd);
        fresh->next = files;
        files = fresh;
        atomic_fetch_add(&nfiles, 1);
    }
    pthread_mutex_unlock(&state_lock);
}

__attribute__((constructor)) static void kvmtag_preload_init(void)
{
    const char *env = getenv("KVMTAG_DEBUG");
    debug = env && *env && strcmp(env, "0");
    resolve();
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}
