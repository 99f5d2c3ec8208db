/* The calling process's memory and mappings: see procmem.h, and kvmtag/procmem.py, whose
 * rules this follows one for one. */
#define _GNU_SOURCE
#include "procmem.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#define IOV_COUNT 1024          /* UIO_MAXIOV: iovecs per process_vm_* call */
#define MAX_CALL (1ul << 30)    /* under MAX_RW_COUNT, beyond which the kernel truncates */
#define TMPFS_MAGIC_ 0x01021994u
#define HUGETLBFS_MAGIC_ 0x958458F6u
#define KIND_UNKNOWN (-1)

/* --- raw system calls ------------------------------------------------------------------------ */

int kt_sys_open(const char *path, int flags)
{
    return (int)syscall(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC, 0);
}

int kt_sys_close(int fd)
{
    return (int)syscall(SYS_close, fd);
}

int kt_sys_fcntl(int fd, int cmd, long arg)
{
    return (int)syscall(SYS_fcntl, fd, cmd, arg);
}

/* --- copies ---------------------------------------------------------------------------------- */

typedef ssize_t (*vm_call)(pid_t, const struct iovec *, unsigned long, const struct iovec *,
                           unsigned long, unsigned long);

static size_t page_size(void)
{
    static size_t size;
    if (!size)
        size = (size_t)sysconf(_SC_PAGESIZE);
    return size;
}

/* One process_vm_readv/writev on ourselves: bytes moved; 0 on a fault at the first byte.
 * procmem.py raises for errors other than EFAULT (ENOSYS or EPERM under a seccomp filter);
 * here they end the copy like a fault: the stream must stay in step whatever happens. */
static size_t call(vm_call fn, void *local, const struct iovec *remote, unsigned long nremote,
                   size_t size)
{
    struct iovec liov = { local, size };
    ssize_t moved = fn(getpid(), &liov, 1, remote, nremote, 0);
    return moved > 0 ? (size_t)moved : 0;
}

/* One call with a remote iovec per page: a partial transfer is promised only at iovec
 * granularity, so this finds the fault to the page on any kernel. */
static size_t transfer_paged(vm_call fn, uint8_t *local, uint64_t remote, size_t size)
{
    struct iovec vecs[IOV_COUNT];
    unsigned long count = 0;
    uint64_t at = remote, end = remote + size;
    size_t page = page_size();

    while (at < end && count < IOV_COUNT) {
        uint64_t step = page - at % page;
        if (step > end - at)
            step = end - at;
        vecs[count].iov_base = (void *)(uintptr_t)at;
        vecs[count].iov_len = step;
        count++;
        at += step;
    }
    return call(fn, local, vecs, count, at - remote);
}

static size_t transfer(vm_call fn, uint8_t *local, uint64_t remote, size_t size)
{
    size_t done = 0, page = page_size();

    if (remote && size > -remote)
        size = -remote; /* the copy stops at the top of the address space */
    while (done < size) {
        size_t n = size - done < MAX_CALL ? size - done : MAX_CALL;
        struct iovec riov = { (void *)(uintptr_t)(remote + done), n };
        size_t moved = call(fn, local + done, &riov, 1, n);
        if (!moved && n > page - (remote + done) % page)
            moved = transfer_paged(fn, local + done, remote + done, n);
        if (!moved)
            break;
        done += moved; /* a short count is a fault or an error: the next call tells */
    }
    return done;
}

size_t kt_read_memory(uint64_t addr, void *buf, size_t size)
{
    return transfer(process_vm_readv, buf, addr, size);
}

size_t kt_write_memory(uint64_t addr, const void *data, size_t size)
{
    /* process_vm_writev reads the local iovec only: the cast drops nothing. */
    return transfer(process_vm_writev, (uint8_t *)(uintptr_t)data, addr, size);
}

/* --- /proc files ----------------------------------------------------------------------------- */

/* The whole of a /proc file, NUL-terminated, malloc'd; NULL with errno. */
static char *read_proc(const char *path, size_t *length)
{
    size_t cap = 64 * 1024, len = 0;
    char *text = malloc(cap);
    int fd, saved;

    if (!text)
        return NULL;
    fd = kt_sys_open(path, O_RDONLY);
    if (fd < 0)
        goto fail;
    for (;;) {
        ssize_t n;
        if (cap - len < 4096) {
            char *bigger = realloc(text, cap * 2);
            if (!bigger)
                goto fail;
            text = bigger;
            cap *= 2;
        }
        n = read(fd, text + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto fail;
        if (n == 0)
            break;
        len += (size_t)n;
    }
    kt_sys_close(fd);
    text[len] = 0;
    *length = len;
    return text;
fail:
    saved = errno;
    if (fd >= 0)
        kt_sys_close(fd);
    free(text);
    errno = saved;
    return NULL;
}

/* --- /proc/self/maps lines ------------------------------------------------------------------- */

struct maps_line {
    uint64_t start, end, pgoff, dev, ino;
    int readable, writable, shared;
    char range_text[40]; /* "start-end" as printed: the name in /proc/self/map_files */
    const char *path;    /* as printed ("\n" is "\012"; a deleted file ends in " (deleted)") */
    size_t path_len;
};

static int file_backed(const struct maps_line *m)
{
    return m->dev != 0 || m->ino != 0; /* SysV segment 0 has inode 0 on shmem's device */
}

/* Parse "start-end perms offset maj:min inode   path" from line[0..len). 0, or -1. */
static int parse_maps_line(const char *line, size_t len, struct maps_line *m)
{
    char buf[160];
    const char *p;
    char *end;
    unsigned long major, minor;
    size_t range_len;

    memset(m, 0, sizeof *m);
    /* The fields before the path are short: parse a NUL-terminated copy of them. */
    size_t head = len < sizeof buf - 1 ? len : sizeof buf - 1;
    memcpy(buf, line, head);
    buf[head] = 0;
    m->start = strtoull(buf, &end, 16);
    if (*end != '-')
        return -1;
    m->end = strtoull(end + 1, &end, 16);
    range_len = (size_t)(end - buf);
    if (*end != ' ' || range_len >= sizeof m->range_text)
        return -1;
    memcpy(m->range_text, buf, range_len);
    m->range_text[range_len] = 0;
    p = end + 1;
    if (strlen(p) < 5 || p[4] != ' ')
        return -1;
    m->readable = p[0] == 'r';
    m->writable = p[1] == 'w';
    m->shared = p[3] == 's';
    m->pgoff = strtoull(p + 5, &end, 16);
    major = strtoul(end, &end, 16);
    if (*end != ':')
        return -1;
    minor = strtoul(end + 1, &end, 16);
    m->dev = makedev(major, minor);
    m->ino = strtoull(end, &end, 10);
    /* The path: the rest of the line after the separating spaces (trailing spaces kept). */
    p = line + (end - buf);
    while (p < line + len && (*p == ' ' || *p == '\t'))
        p++;
    m->path = p;
    m->path_len = (size_t)(line + len - p);
    return 0;
}

static int path_is(const struct maps_line *m, const char *s)
{
    return m->path_len == strlen(s) && !memcmp(m->path, s, m->path_len);
}

static int path_starts(const struct maps_line *m, const char *prefix)
{
    size_t n = strlen(prefix);
    return m->path_len >= n && !memcmp(m->path, prefix, n);
}

static int path_ends(const struct maps_line *m, const char *suffix)
{
    size_t n = strlen(suffix);
    return m->path_len >= n && !memcmp(m->path + m->path_len - n, suffix, n);
}

/* --- what backs a mapping -------------------------------------------------------------------- */

/* The device of shmem's internal mount (memfd, shared anonymous memory, SysV shm), which
 * mountinfo never lists: probed once with a memfd. 0 when it could not be probed. */
static pthread_once_t shmem_once = PTHREAD_ONCE_INIT;
static uint64_t shmem_dev;

static void probe_shmem(void)
{
    struct stat st;
    int fd = memfd_create("kvmtag-probe", MFD_CLOEXEC);
    if (fd < 0)
        return;
    if (!fstat(fd, &st))
        shmem_dev = st.st_dev;
    kt_sys_close(fd);
}

static uint64_t shmem_device(void)
{
    pthread_once(&shmem_once, probe_shmem);
    return shmem_dev;
}

/* What one kt_find_vmas call learns about the process, each at most once and only if needed. */
struct mount { uint64_t dev; int kind; };
struct open_file { uint64_t dev, ino; int fd, mode; };
struct lookup {
    struct mount *mounts;
    size_t nmounts;
    int mounts_read;
    struct open_file *files;
    size_t nfiles;
    int files_read;
};

/* Filesystem kind by superblock device, from /proc/self/mountinfo: "id parent maj:min root
 * mountpoint options [optional...] - fstype source super". The first line of a device wins. */
static void read_mounts(struct lookup *lk)
{
    size_t len, cap = 0;
    char *text = read_proc("/proc/self/mountinfo", &len);
    char *line, *next;

    lk->mounts_read = 1;
    if (!text)
        return;
    for (line = text; line < text + len; line = next) {
        char *nl = strchr(line, '\n'), *field[64];
        int nfields = 0, dash = -1;
        unsigned long major, minor;
        next = nl ? nl + 1 : text + len;
        if (nl)
            *nl = 0;
        for (char *tok = line; tok && nfields < 64;) {
            field[nfields++] = tok;
            tok = strchr(tok, ' ');
            if (tok)
                *tok++ = 0;
        }
        for (int i = 6; i < nfields; i++) {
            if (!strcmp(field[i], "-")) {
                dash = i;
                break;
            }
        }
        if (nfields < 3 || dash < 0 || dash + 1 >= nfields
            || sscanf(field[2], "%lu:%lu", &major, &minor) != 2)
            continue;
        uint64_t dev = makedev(major, minor);
        int seen = 0;
        for (size_t i = 0; i < lk->nmounts; i++)
            seen |= lk->mounts[i].dev == dev;
        if (seen)
            continue;
        if (lk->nmounts == cap) {
            size_t bigger = cap ? cap * 2 : 64;
            struct mount *grown = realloc(lk->mounts, bigger * sizeof *grown);
            if (!grown)
                break;
            lk->mounts = grown;
            cap = bigger;
        }
        const char *fstype = field[dash + 1];
        int kind = !strcmp(fstype, "tmpfs") || !strcmp(fstype, "devtmpfs") ? KT_VMA_SHMEM
                 : !strcmp(fstype, "hugetlbfs") ? KT_VMA_HUGETLBFS : KT_VMA_FILE;
        lk->mounts[lk->nmounts++] = (struct mount){ dev, kind };
    }
    free(text);
}

static int mount_kind(struct lookup *lk, uint64_t dev)
{
    if (!lk->mounts_read)
        read_mounts(lk);
    for (size_t i = 0; i < lk->nmounts; i++) {
        if (lk->mounts[i].dev == dev)
            return lk->mounts[i].kind;
    }
    return KIND_UNKNOWN;
}

static int mode_rank(int mode)
{
    return mode == O_RDWR ? 2 : mode == O_RDONLY ? 1 : 0;
}

/* One pass over /proc/self/fd: each regular file's best descriptor, O_RDWR preferred, then
 * O_RDONLY, then anything else (-1: usable only by reopening it: O_WRONLY, O_PATH, and O_APPEND
 * or O_DIRECT, which a dup would share). */
static void scan_fds(struct lookup *lk)
{
    size_t cap = 0;
    DIR *dir;
    struct dirent *entry;

    lk->files_read = 1;
    dir = opendir("/proc/self/fd");
    if (!dir)
        return;
    while ((entry = readdir(dir))) {
        struct stat st;
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        int flags, mode;
        size_t i;

        if (*end || end == entry->d_name || fd == dirfd(dir))
            continue;
        if (fstat((int)fd, &st) || !S_ISREG(st.st_mode))
            continue;
        flags = kt_sys_fcntl((int)fd, F_GETFL, 0);
        if (flags < 0)
            continue; /* closed since by another thread */
        mode = flags & (O_PATH | O_APPEND | O_DIRECT) ? -1 : flags & O_ACCMODE;
        for (i = 0; i < lk->nfiles; i++) {
            if (lk->files[i].dev == st.st_dev && lk->files[i].ino == st.st_ino)
                break;
        }
        if (i < lk->nfiles) {
            if (mode_rank(mode) > mode_rank(lk->files[i].mode))
                lk->files[i].fd = (int)fd, lk->files[i].mode = mode;
            continue;
        }
        if (lk->nfiles == cap) {
            size_t bigger = cap ? cap * 2 : 64;
            struct open_file *grown = realloc(lk->files, bigger * sizeof *grown);
            if (!grown)
                break;
            lk->files = grown;
            cap = bigger;
        }
        lk->files[lk->nfiles++] = (struct open_file){ st.st_dev, st.st_ino, (int)fd, mode };
    }
    closedir(dir);
}

/* Keep a new descriptor only if it is the mapping's file (an fd number may have been closed
 * and reused since the scan, a mapping replaced since the read). */
static int verified(int fd, const struct maps_line *m)
{
    struct stat st;
    if (fd < 0)
        return -1;
    if (!fstat(fd, &st) && st.st_dev == m->dev && st.st_ino == m->ino)
        return fd;
    kt_sys_close(fd);
    return -1;
}

/* A new O_CLOEXEC descriptor for a shared mapping's memory, or -1 (tags-only): our own open
 * descriptors first (dup one whose access suffices, else reopen it through /proc/self/fd), then
 * /proc/self/map_files, which needs CAP_SYS_ADMIN. */
static int find_fd(const struct maps_line *m, struct lookup *lk)
{
    int need = m->writable ? O_RDWR : O_RDONLY;
    char path[96];
    int fd;

    if (!lk->files_read)
        scan_fds(lk);
    for (size_t i = 0; i < lk->nfiles; i++) {
        const struct open_file *f = &lk->files[i];
        if (f->dev != m->dev || f->ino != m->ino)
            continue;
        if (f->mode == O_RDWR || f->mode == need) {
            fd = verified(kt_sys_fcntl(f->fd, F_DUPFD_CLOEXEC, 0), m);
        } else {
            snprintf(path, sizeof path, "/proc/self/fd/%d", f->fd);
            fd = verified(kt_sys_open(path, need), m);
        }
        if (fd >= 0)
            return fd;
        break;
    }
    snprintf(path, sizeof path, "/proc/self/map_files/%s", m->range_text);
    return verified(kt_sys_open(path, need), m);
}

/* ANON for a private /dev/zero mapping, OTHER for any other device node, else unknown. */
static int device_node_kind(const struct maps_line *m)
{
    char path[PATH_MAX];
    size_t n = 0;
    struct stat st;

    if (!path_starts(m, "/") || path_ends(m, " (deleted)"))
        return KIND_UNKNOWN;
    for (size_t i = 0; i < m->path_len; i++) {
        if (n + 1 >= sizeof path)
            return KIND_UNKNOWN;
        if (m->path_len - i >= 4 && !memcmp(m->path + i, "\\012", 4)) {
            path[n++] = '\n';
            i += 3;
        } else {
            path[n++] = m->path[i];
        }
    }
    path[n] = 0;
    if (stat(path, &st) || st.st_dev != m->dev || st.st_ino != m->ino
        || !(S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)))
        return KIND_UNKNOWN;
    return S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 5) ? KT_VMA_ANON : KT_VMA_OTHER;
}

/* What the maps line alone tells, or unknown. */
static int line_kind(const struct maps_line *m)
{
    if (!file_backed(m)) {
        if (!m->path_len || path_starts(m, "[heap]") || path_starts(m, "[stack")
            || path_starts(m, "[anon:"))
            return KT_VMA_ANON;
        return KT_VMA_OTHER; /* [vvar], [vdso], [vsyscall], [uprobes], ... */
    }
    if (path_starts(m, "[anon_shmem:"))
        return KT_VMA_ANON; /* shared anonymous memory given a name */
    if (path_is(m, "/dev/zero (deleted)") && (!shmem_device() || shmem_device() == m->dev))
        return KT_VMA_ANON; /* MAP_SHARED|MAP_ANONYMOUS */
    if (path_is(m, "/anon_hugepage (deleted)") || path_is(m, "anon_hugepage"))
        return KT_VMA_HUGETLBFS; /* MAP_HUGETLB|MAP_ANONYMOUS */
    if (!path_starts(m, "/"))
        return KT_VMA_OTHER; /* "anon_inode:..." and other pseudo files */
    return device_node_kind(m);
}

/* The filesystem behind a file mapping: fstatfs of its descriptor, else mountinfo, else the
 * kernel-internal mounts (shmem's, then hugetlbfs's by name). */
static int backing_kind(const struct maps_line *m, struct lookup *lk, int fd)
{
    struct statfs sfs;
    int kind;

    if (fd >= 0 && !fstatfs(fd, &sfs)) {
        uint32_t magic = (uint32_t)sfs.f_type;
        return magic == TMPFS_MAGIC_ ? KT_VMA_SHMEM
             : magic == HUGETLBFS_MAGIC_ ? KT_VMA_HUGETLBFS : KT_VMA_FILE;
    }
    kind = mount_kind(lk, m->dev);
    if (kind != KIND_UNKNOWN)
        return kind;
    if (shmem_device() && m->dev == shmem_device())
        return KT_VMA_SHMEM;
    if (path_starts(m, "/memfd:") || path_starts(m, "/SYSV"))
        return KT_VMA_HUGETLBFS; /* on an internal mount that is not shmem's: hugetlbfs's */
    return KT_VMA_FILE;
}

void kt_free_vmas(struct kt_found_vma *vmas, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (vmas[i].fd >= 0)
            kt_sys_close(vmas[i].fd);
    }
    free(vmas);
}

int kt_find_vmas(uint64_t start, uint64_t end, struct kt_found_vma **out, size_t *count)
{
    struct lookup lk = { 0 };
    struct kt_found_vma *vmas = NULL;
    size_t n = 0, cap = 0, len;
    char *text, *line, *next;
    int saved;

    *out = NULL;
    *count = 0;
    if (start >= end)
        return 0;
    text = read_proc("/proc/self/maps", &len);
    if (!text)
        return -1;
    /* Lines end at "\n" only ("\n" in a file name is printed as "\012"). */
    for (line = text; line < text + len; line = next) {
        struct maps_line m;
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        int kind, fd = -1;

        next = nl ? nl + 1 : text + len;
        if (line == (nl ? nl : text + len))
            continue;
        if (parse_maps_line(line, (size_t)((nl ? nl : text + len) - line), &m))
            continue;
        if (m.start >= end)
            break;
        if (m.end <= start)
            continue;
        kind = line_kind(&m);
        if (m.shared && file_backed(&m) && kind != KT_VMA_OTHER)
            fd = find_fd(&m, &lk);
        if (kind == KIND_UNKNOWN)
            kind = backing_kind(&m, &lk, fd);
        if (kind == KT_VMA_OTHER && fd >= 0) {
            kt_sys_close(fd);
            fd = -1;
        }
        if (n == cap) {
            size_t bigger = cap ? cap * 2 : 16;
            struct kt_found_vma *grown = realloc(vmas, bigger * sizeof *grown);
            if (!grown) {
                if (fd >= 0)
                    kt_sys_close(fd);
                errno = ENOMEM;
                goto fail;
            }
            vmas = grown;
            cap = bigger;
        }
        vmas[n].fd = fd;
        vmas[n].vma = (struct kt_vma){
            .start = m.start, .end = m.end, .pgoff = m.pgoff, .dev = m.dev, .ino = m.ino,
            .kind = (uint32_t)kind,
            .flags = (m.shared ? KT_VMA_SHARED : 0) | (m.writable ? KT_VMA_WRITABLE : 0)
                   | (fd >= 0 ? KT_VMA_HAS_FD : 0) | (m.readable ? KT_VMA_READABLE : 0),
        };
        n++;
    }
    free(text);
    free(lk.mounts);
    free(lk.files);
    *out = vmas;
    *count = n;
    return 0;
fail:
    saved = errno;
    free(text);
    free(lk.mounts);
    free(lk.files);
    kt_free_vmas(vmas, n);
    errno = saved;
    return -1;
}
