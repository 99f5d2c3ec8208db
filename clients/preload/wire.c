/* The kvmtag wire codec in C: see wire.h. Mirrors kvmtag/wire.py check for check, in the same
 * order, so a frame is a violation for one side exactly when it is for the other. */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

static const char *const type_names[] = {
    "?", "HELLO", "HELLO_REPLY", "IOCTL", "REPLY", "READ", "READ_DATA",
    "WRITE", "WRITE_DONE", "VMAS", "VMAS_DATA", "ERROR", "READ_WINDOW", "WRITE_WINDOW",
    "WINDOW_DONE",
};

const char *kt_type_name(unsigned type)
{
    return type >= 1 && type <= KT_TYPE_MAX ? type_names[type] : "?";
}

static int from_client(unsigned type)
{
    return type == KT_HELLO || type == KT_IOCTL || type == KT_READ_DATA || type == KT_WRITE_DONE
        || type == KT_VMAS_DATA || type == KT_WINDOW_DONE;
}

int kt_receives(enum kt_role role, unsigned type)
{
    if (type < KT_HELLO || type > KT_TYPE_MAX)
        return 0;
    return role == KT_ROLE_DAEMON ? from_client(type) : !from_client(type);
}

int kt_may_carry_fds(unsigned type)
{
    return type == KT_HELLO_REPLY || type == KT_REPLY || type == KT_VMAS_DATA;
}

int kt_decode_header(const uint8_t *buf, size_t avail, uint32_t max_message, enum kt_role role,
                     size_t fds_at_start, struct kt_header *h, const char **why)
{
    if (avail < KT_HEADER_SIZE)
        return KT_NEED_DATA;
    h->length = kt_get32(buf);
    h->type = kt_get16(buf + 4);
    h->nfds = kt_get16(buf + 6);
    h->id = kt_get32(buf + 8);
    h->reserved = kt_get32(buf + 12);
    /* Bound the frame before its body is buffered. */
    if (h->length < KT_HEADER_SIZE || h->length > max_message) {
        *why = "frame length outside [16, max_message]";
        return KT_VIOLATION;
    }
    if (h->reserved) {
        *why = "reserved header field is not 0";
        return KT_VIOLATION;
    }
    if (h->type < KT_HELLO || h->type > KT_TYPE_MAX) {
        *why = "unknown message type";
        return KT_VIOLATION;
    }
    if (!kt_receives(role, h->type)) {
        *why = "message type may not be sent by this peer";
        return KT_VIOLATION;
    }
    if (h->nfds && (!kt_may_carry_fds(h->type) || h->nfds > KT_MAX_FDS)) {
        *why = "descriptors on a message that may not carry them (or too many)";
        return KT_VIOLATION;
    }
    if (fds_at_start != h->nfds) {
        *why = "the frame declares another number of descriptors than came with it";
        return KT_VIOLATION;
    }
    return KT_OK;
}

void kt_decode_vma(const uint8_t *r, struct kt_vma *vma)
{
    vma->start = kt_get64(r);
    vma->end = kt_get64(r + 8);
    vma->pgoff = kt_get64(r + 16);
    vma->dev = kt_get64(r + 24);
    vma->ino = kt_get64(r + 32);
    vma->kind = kt_get32(r + 40);
    vma->flags = kt_get32(r + 44);
}

void kt_encode_vma(uint8_t *r, const struct kt_vma *vma)
{
    kt_put64(r, vma->start);
    kt_put64(r + 8, vma->end);
    kt_put64(r + 16, vma->pgoff);
    kt_put64(r + 24, vma->dev);
    kt_put64(r + 32, vma->ino);
    kt_put32(r + 40, vma->kind);
    kt_put32(r + 44, vma->flags);
}

/* Body of exactly (exact) or at least `size` bytes. */
static int sized(size_t len, size_t size, int exact, const char **why)
{
    if (len < size || (exact && len != size)) {
        *why = "body size does not match its message type";
        return 0;
    }
    return 1;
}

int kt_decode_body(const struct kt_header *h, const uint8_t *frame, struct kt_event *ev,
                   const char **why)
{
    const uint8_t *b = frame + KT_HEADER_SIZE;
    size_t len = h->length - KT_HEADER_SIZE;

    memset(ev, 0, sizeof *ev);
    ev->type = h->type;
    ev->nfds = h->nfds;
    ev->id = h->id;
    switch (h->type) {
    case KT_HELLO:
        if (!sized(len, KT_HELLO_SIZE, 1, why))
            return KT_VIOLATION;
        if (memcmp(b, KT_MAGIC, 4)) {
            *why = "bad magic";
            return KT_VIOLATION;
        }
        ev->u.hello.major = kt_get16(b + 4);
        ev->u.hello.minor = kt_get16(b + 6);
        ev->u.hello.flags = kt_get32(b + 8);
        return KT_OK;
    case KT_HELLO_REPLY: {
        struct kt_hello_reply *r = &ev->u.hello_reply;
        if (!sized(len, KT_HELLO_REPLY_SIZE, 1, why))
            return KT_VIOLATION;
        if (memcmp(b, KT_MAGIC, 4)) {
            *why = "bad magic";
            return KT_VIOLATION;
        }
        r->major = kt_get16(b + 4);
        r->minor = kt_get16(b + 6);
        r->fd_kind = kt_get32(b + 8);
        r->page_size = kt_get32(b + 12);
        r->max_message = kt_get32(b + 16);
        r->max_fds = kt_get32(b + 20);
        r->window = kt_get32(b + 24);
        r->err = kt_get32(b + 28);
        r->extensions = kt_get64(b + 32);
        memcpy(r->profile, b + 40, 16);
        r->profile[16] = 0;
        if (r->fd_kind > KT_FD_VCPU) {
            *why = "unknown fd kind";
            return KT_VIOLATION;
        }
        for (int i = 0; i < 16; i++) {
            if ((unsigned char)r->profile[i] >= 0x80) {
                *why = "kernel profile name is not ASCII";
                return KT_VIOLATION;
            }
        }
        return KT_OK;
    }
    case KT_IOCTL:
        if (!sized(len, KT_IOCTL_SIZE, 0, why))
            return KT_VIOLATION;
        ev->u.ioctl.request = kt_get32(b);
        ev->u.ioctl.flags = kt_get32(b + 4);
        ev->u.ioctl.arg = kt_get64(b + 8);
        if (!(ev->u.ioctl.flags & KT_IOCTL_INLINE) && len > KT_IOCTL_SIZE) {
            *why = "inline bytes without IOCTL_INLINE";
            return KT_VIOLATION;
        }
        ev->data = b + KT_IOCTL_SIZE;
        ev->data_len = len - KT_IOCTL_SIZE;
        return KT_OK;
    case KT_REPLY:
        if (!sized(len, KT_REPLY_SIZE, 0, why))
            return KT_VIOLATION;
        ev->u.reply.result = (int64_t)kt_get64(b);
        ev->u.reply.err = kt_get32(b + 8);
        ev->u.reply.flags = kt_get32(b + 12);
        /* As wire.py: bytes after the body mean something only with REPLY_WRITTEN_BACK. */
        if (ev->u.reply.flags & KT_REPLY_WRITTEN_BACK) {
            ev->data = b + KT_REPLY_SIZE;
            ev->data_len = len - KT_REPLY_SIZE;
        }
        return KT_OK;
    case KT_READ:
        if (!sized(len, KT_READ_SIZE, 1, why))
            return KT_VIOLATION;
        ev->u.read.addr = kt_get64(b);
        ev->u.read.size = kt_get64(b + 8);
        return KT_OK;
    case KT_READ_DATA:
        ev->data = b;
        ev->data_len = len;
        return KT_OK;
    case KT_WRITE:
        if (!sized(len, KT_WRITE_SIZE, 0, why))
            return KT_VIOLATION;
        ev->u.write.addr = kt_get64(b);
        ev->data = b + KT_WRITE_SIZE;
        ev->data_len = len - KT_WRITE_SIZE;
        return KT_OK;
    case KT_WRITE_DONE:
        if (!sized(len, KT_WRITE_DONE_SIZE, 1, why))
            return KT_VIOLATION;
        ev->u.write_done.written = kt_get64(b);
        return KT_OK;
    case KT_VMAS:
        if (!sized(len, KT_VMAS_SIZE, 1, why))
            return KT_VIOLATION;
        ev->u.vmas.start = kt_get64(b);
        ev->u.vmas.end = kt_get64(b + 8);
        return KT_OK;
    case KT_VMAS_DATA: {
        if (!sized(len, KT_VMAS_DATA_SIZE, 0, why))
            return KT_VIOLATION;
        uint32_t count = kt_get32(b);
        size_t with_fd = 0;
        ev->u.vmas_data.count = count;
        ev->u.vmas_data.pad = kt_get32(b + 4);
        if (len - KT_VMAS_DATA_SIZE != (uint64_t)count * KT_VMA_RECORD_SIZE) {
            *why = "VMAS_DATA records do not fill the body";
            return KT_VIOLATION;
        }
        ev->data = b + KT_VMAS_DATA_SIZE;
        ev->data_len = len - KT_VMAS_DATA_SIZE;
        for (uint32_t i = 0; i < count; i++) {
            struct kt_vma vma;
            kt_decode_vma(ev->data + (size_t)i * KT_VMA_RECORD_SIZE, &vma);
            if (vma.kind >= KT_VMA_NKINDS) {
                *why = "unknown mapping kind";
                return KT_VIOLATION;
            }
            if (vma.start >= vma.end) {
                *why = "empty or inverted mapping range";
                return KT_VIOLATION;
            }
            if (vma.flags & KT_VMA_HAS_FD) {
                if (with_fd >= h->nfds) {
                    *why = "more records with descriptors than descriptors";
                    return KT_VIOLATION;
                }
                with_fd++;
            }
        }
        if (with_fd != h->nfds) {
            *why = "descriptors with no record";
            return KT_VIOLATION;
        }
        return KT_OK;
    }
    case KT_ERROR:
        if (!sized(len, KT_ERROR_SIZE, 0, why))
            return KT_VIOLATION;
        ev->u.error.code = kt_get32(b);
        ev->data = b + KT_ERROR_SIZE;
        ev->data_len = len - KT_ERROR_SIZE;
        return KT_OK;
    case KT_READ_WINDOW:
    case KT_WRITE_WINDOW:
        if (!sized(len, KT_WINDOW_OP_SIZE, 1, why))
            return KT_VIOLATION;
        ev->u.window.addr = kt_get64(b);
        ev->u.window.size = kt_get64(b + 8);
        return KT_OK;
    case KT_WINDOW_DONE:
        if (!sized(len, KT_WINDOW_DONE_SIZE, 1, why))
            return KT_VIOLATION;
        ev->u.window_done.count = kt_get64(b);
        return KT_OK;
    }
    *why = "unknown message type";
    return KT_VIOLATION;
}

size_t kt_encode_head(const struct kt_event *ev, uint8_t *out)
{
    uint8_t *b = out + KT_HEADER_SIZE;
    size_t fixed;

    switch (ev->type) {
    case KT_HELLO:
        memcpy(b, KT_MAGIC, 4);
        kt_put16(b + 4, ev->u.hello.major);
        kt_put16(b + 6, ev->u.hello.minor);
        kt_put32(b + 8, ev->u.hello.flags);
        fixed = KT_HELLO_SIZE;
        break;
    case KT_HELLO_REPLY: {
        const struct kt_hello_reply *r = &ev->u.hello_reply;
        memcpy(b, KT_MAGIC, 4);
        kt_put16(b + 4, r->major);
        kt_put16(b + 6, r->minor);
        kt_put32(b + 8, r->fd_kind);
        kt_put32(b + 12, r->page_size);
        kt_put32(b + 16, r->max_message);
        kt_put32(b + 20, r->max_fds);
        kt_put32(b + 24, r->window);
        kt_put32(b + 28, r->err);
        kt_put64(b + 32, r->extensions);
        memcpy(b + 40, r->profile, 16);
        fixed = KT_HELLO_REPLY_SIZE;
        break;
    }
    case KT_IOCTL:
        kt_put32(b, ev->u.ioctl.request);
        kt_put32(b + 4, ev->u.ioctl.flags);
        kt_put64(b + 8, ev->u.ioctl.arg);
        fixed = KT_IOCTL_SIZE;
        break;
    case KT_REPLY:
        kt_put64(b, (uint64_t)ev->u.reply.result);
        kt_put32(b + 8, ev->u.reply.err);
        kt_put32(b + 12, ev->u.reply.flags);
        fixed = KT_REPLY_SIZE;
        break;
    case KT_READ:
        kt_put64(b, ev->u.read.addr);
        kt_put64(b + 8, ev->u.read.size);
        fixed = KT_READ_SIZE;
        break;
    case KT_READ_DATA:
        fixed = 0;
        break;
    case KT_WRITE:
        kt_put64(b, ev->u.write.addr);
        fixed = KT_WRITE_SIZE;
        break;
    case KT_WRITE_DONE:
        kt_put64(b, ev->u.write_done.written);
        fixed = KT_WRITE_DONE_SIZE;
        break;
    case KT_VMAS:
        kt_put64(b, ev->u.vmas.start);
        kt_put64(b + 8, ev->u.vmas.end);
        fixed = KT_VMAS_SIZE;
        break;
    case KT_VMAS_DATA:
        kt_put32(b, ev->u.vmas_data.count);
        kt_put32(b + 4, ev->u.vmas_data.pad);
        fixed = KT_VMAS_DATA_SIZE;
        break;
    case KT_ERROR:
        kt_put32(b, ev->u.error.code);
        fixed = KT_ERROR_SIZE;
        break;
    case KT_READ_WINDOW:
    case KT_WRITE_WINDOW:
        kt_put64(b, ev->u.window.addr);
        kt_put64(b + 8, ev->u.window.size);
        fixed = KT_WINDOW_OP_SIZE;
        break;
    case KT_WINDOW_DONE:
        kt_put64(b, ev->u.window_done.count);
        fixed = KT_WINDOW_DONE_SIZE;
        break;
    default:
        return 0;
    }
    if (ev->nfds && (!kt_may_carry_fds(ev->type) || ev->nfds > KT_MAX_FDS))
        return 0;
    if (ev->data_len > KT_MAX_MESSAGE_LIMIT - KT_HEADER_SIZE - fixed)
        return 0; /* the connection bounds its frames by the peer's max_message first */
    kt_put32(out, (uint32_t)(KT_HEADER_SIZE + fixed + ev->data_len));
    kt_put16(out + 4, ev->type);
    kt_put16(out + 6, ev->nfds);
    kt_put32(out + 8, ev->id);
    kt_put32(out + 12, 0);
    return KT_HEADER_SIZE + fixed;
}

size_t kt_encode(const struct kt_event *ev, uint8_t *out, size_t cap)
{
    uint8_t head[KT_HEADER_SIZE + KT_HELLO_REPLY_SIZE];
    size_t n = kt_encode_head(ev, head);

    if (!n || n + ev->data_len > cap)
        return 0;
    memcpy(out, head, n);
    if (ev->data_len)
        memcpy(out + n, ev->data, ev->data_len);
    return n + ev->data_len;
}

/* --- the stream reader ------------------------------------------------------------------------ */

#define READER_INITIAL (64 * 1024)

void kt_reader_init(struct kt_reader *r, enum kt_role role, uint32_t max_message)
{
    memset(r, 0, sizeof *r);
    r->role = role;
    r->max_message = max_message;
}

void kt_reader_free(struct kt_reader *r)
{
    free(r->buf);
    r->buf = NULL;
    r->cap = r->pos = r->len = 0;
}

uint8_t *kt_reader_space(struct kt_reader *r, size_t *room)
{
    size_t avail = r->len - r->pos, need = KT_HEADER_SIZE;

    if (avail >= KT_HEADER_SIZE) {
        uint32_t length = kt_get32(r->buf + r->pos);
        if (length >= KT_HEADER_SIZE && length <= r->max_message)
            need = length; /* room for the whole frame: a bulk frame in as few receives as can be */
    }
    if (need <= avail)
        need = avail + 1; /* a frame is complete already: room for one more byte at least */
    if (r->cap - r->pos < need || (avail == 0 && r->pos)) {
        if (avail)
            memmove(r->buf, r->buf + r->pos, avail);
        r->pos = 0;
        r->len = avail;
    }
    if (r->cap < need || !r->buf) {
        size_t cap = need < READER_INITIAL ? READER_INITIAL : need;
        uint8_t *grown = realloc(r->buf, cap);
        if (!grown)
            return NULL;
        r->buf = grown;
        r->cap = cap;
    }
    *room = r->cap - r->len;
    return r->buf + r->len;
}

int kt_reader_received(struct kt_reader *r, size_t n, const int *fds, int nfds, const char **why)
{
    if (nfds > 0) {
        struct kt_mark *m;
        if (r->nmarks == KT_MAX_MARKS) {
            /* Keep them where kt_reader_take_fds finds them, merged into the last mark. */
            m = &r->marks[r->nmarks - 1];
            for (int i = 0; i < nfds && m->n < KT_MAX_FDS; i++)
                m->fds[m->n++] = fds[i];
            r->len += n;
            *why = "too many receives with descriptors no frame claimed";
            return KT_VIOLATION;
        }
        m = &r->marks[r->nmarks++];
        m->offset = r->offset + (r->len - r->pos);
        m->n = nfds < KT_MAX_FDS ? nfds : KT_MAX_FDS;
        memcpy(m->fds, fds, sizeof(int) * (size_t)m->n);
    }
    r->len += n;
    return KT_OK;
}

/* Put a frame's descriptors back at the head of the queue (after a violation: the caller then
 * takes and closes every queued one). There is room: they were just taken from it. */
static void requeue(struct kt_reader *r, uint64_t offset, const int *fds, size_t n)
{
    if (!n || r->nmarks == KT_MAX_MARKS)
        return;
    memmove(r->marks + 1, r->marks, sizeof r->marks[0] * (size_t)r->nmarks);
    r->nmarks++;
    r->marks[0].offset = offset;
    r->marks[0].n = (int)n;
    memcpy(r->marks[0].fds, fds, sizeof(int) * n);
}

int kt_reader_next(struct kt_reader *r, struct kt_event *ev, int *fds, const char **why)
{
    size_t avail = r->len - r->pos, at_start = 0;
    uint64_t start = r->offset;
    struct kt_header h;
    int rc;

    if (avail < KT_HEADER_SIZE)
        return KT_NEED_DATA;
    if (r->nmarks && r->marks[0].offset == start)
        at_start = (size_t)r->marks[0].n;
    rc = kt_decode_header(r->buf + r->pos, avail, r->max_message, r->role, at_start, &h, why);
    if (rc != KT_OK)
        return rc;
    if (avail < h.length)
        return KT_NEED_DATA;
    if (at_start) {
        memcpy(fds, r->marks[0].fds, sizeof(int) * at_start);
        memmove(r->marks, r->marks + 1, sizeof r->marks[0] * (size_t)--r->nmarks);
    }
    if (r->nmarks && r->marks[0].offset < start + h.length) {
        requeue(r, start, fds, at_start);
        *why = "descriptors inside a frame";
        return KT_VIOLATION;
    }
    rc = kt_decode_body(&h, r->buf + r->pos, ev, why);
    r->pos += h.length;
    r->offset += h.length;
    if (rc != KT_OK)
        requeue(r, start, fds, at_start);
    return rc;
}

int kt_reader_take_fds(struct kt_reader *r, int *out, int max)
{
    int n = 0;
    for (int i = 0; i < r->nmarks; i++) {
        for (int j = 0; j < r->marks[i].n && n < max; j++)
            out[n++] = r->marks[i].fds[j];
    }
    r->nmarks = 0;
    return n;
}
