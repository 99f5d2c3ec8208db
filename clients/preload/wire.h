/* The kvmtag wire protocol (docs/PROTOCOL.md, version 1.1) in C: frames <-> events, no I/O.
 *
 * kvmtag/wire.py is the source of truth for every byte layout; tests/test_preload.py feeds
 * frames made by it through this codec (decode, re-encode, compare) and the other way round,
 * so both sides provably speak the same protocol. Like wire.py this layer never touches a
 * socket: the connection code hands it bytes and gets events back.
 *
 * All integers on the wire are little-endian; encoders and decoders go byte by byte, so the
 * code is correct on any host byte order and never reads an unaligned field.
 */
#ifndef KVMTAG_WIRE_H
#define KVMTAG_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define KT_MAGIC "KVMT"
#define KT_VERSION_MAJOR 1
#define KT_VERSION_MINOR 1                    /* 1.1: the shared window */
#define KT_HEADER_SIZE 16
#define KT_MAX_FDS 32                         /* descriptors in one frame */
#define KT_WINDOW (4u << 20)                  /* largest READ or WRITE; the shared window's size */
#define KT_MAX_MESSAGE (KT_WINDOW + 4096)     /* largest frame either side sends or accepts */
/* The handshake tells the daemon's real limits (HELLO_REPLY max_message, window); the shim
 * uses those, bounded by this, so a daemon with other limits is still understood. */
#define KT_MAX_MESSAGE_LIMIT (64u << 20)
#define KT_MAX_MARKS 8                        /* receives with descriptors not yet claimed */

/* Fixed body sizes (the part before any trailing bytes). */
#define KT_HELLO_SIZE 12
#define KT_HELLO_REPLY_SIZE 56
#define KT_IOCTL_SIZE 16
#define KT_REPLY_SIZE 16
#define KT_READ_SIZE 16
#define KT_WRITE_SIZE 8
#define KT_WRITE_DONE_SIZE 8
#define KT_VMAS_SIZE 16
#define KT_VMAS_DATA_SIZE 8
#define KT_VMA_RECORD_SIZE 48
#define KT_ERROR_SIZE 4
#define KT_WINDOW_OP_SIZE 16                  /* READ_WINDOW, WRITE_WINDOW */
#define KT_WINDOW_DONE_SIZE 8

enum kt_type {
    KT_HELLO = 1,       /* client -> daemon, first frame of every connection */
    KT_HELLO_REPLY = 2, /* daemon -> client */
    KT_IOCTL = 3,       /* client -> daemon */
    KT_REPLY = 4,       /* daemon -> client; may carry fds (CREATE_VM, CREATE_VCPU) */
    KT_READ = 5,        /* daemon -> client: read your memory */
    KT_READ_DATA = 6,   /* client -> daemon: the readable prefix */
    KT_WRITE = 7,       /* daemon -> client: write your memory */
    KT_WRITE_DONE = 8,  /* client -> daemon: how many leading bytes were written */
    KT_VMAS = 9,        /* daemon -> client: describe your mappings */
    KT_VMAS_DATA = 10,  /* client -> daemon; may carry fds, one per record with KT_VMA_HAS_FD */
    KT_ERROR = 11,      /* daemon -> client: protocol violation; the daemon then closes */
    /* 1.1, on a connection with a shared window (HELLO flag KT_HELLO_SHARED_WINDOW): */
    KT_READ_WINDOW = 12,  /* daemon -> client: read your memory into the window's first bytes */
    KT_WRITE_WINDOW = 13, /* daemon -> client: write the window's first bytes to your memory */
    KT_WINDOW_DONE = 14,  /* client -> daemon: how many leading bytes either one copied */
    KT_TYPE_MAX = KT_WINDOW_DONE,
};

/* HELLO flags. SHARED_WINDOW: the client can use a shared window; the daemon may then send one
 * descriptor with HELLO_REPLY, a memfd of `window` bytes the client maps MAP_SHARED. */
#define KT_HELLO_SHARED_WINDOW (1u << 0)

enum kt_fd_kind { KT_FD_SYSTEM = 0, KT_FD_VM = 1, KT_FD_VCPU = 2 };

#define KT_IOCTL_INLINE (1u << 0)          /* an inline struct follows the IOCTL body */
#define KT_IOCTL_INLINE_WRITABLE (1u << 1) /* ... and the daemon may write it back */
#define KT_REPLY_WRITTEN_BACK (1u << 0)    /* the reply carries the inline struct back */

/* VMAS_DATA records: kind is an index, flags a bit set. */
enum kt_vma_kind {
    KT_VMA_ANON = 0,
    KT_VMA_SHMEM = 1,     /* memfd, tmpfs, SysV shm */
    KT_VMA_HUGETLBFS = 2,
    KT_VMA_FILE = 3,      /* a file on any other filesystem */
    KT_VMA_OTHER = 4,     /* device or special */
    KT_VMA_NKINDS = 5,
};
#define KT_VMA_SHARED 1u
#define KT_VMA_WRITABLE 2u
#define KT_VMA_HAS_FD 4u
#define KT_VMA_READABLE 8u

/* Who decodes: a client receives the daemon's frames, the daemon the client's. */
enum kt_role { KT_ROLE_CLIENT = 0, KT_ROLE_DAEMON = 1 };

/* Results of the decoders. */
#define KT_OK 0
#define KT_NEED_DATA 1
#define KT_VIOLATION (-1) /* the peer broke the protocol: see the error text */

struct kt_header {
    uint32_t length; /* whole frame, header included */
    uint16_t type;
    uint16_t nfds;
    uint32_t id;
    uint32_t reserved;
};

struct kt_hello_reply {
    uint16_t major, minor;
    uint32_t fd_kind;
    uint32_t page_size;
    uint32_t max_message;
    uint32_t max_fds;
    uint32_t window;
    uint32_t err; /* non-zero: refused, then closed */
    uint64_t extensions;
    char profile[17]; /* NUL-padded on the wire (16 bytes); always NUL-terminated here */
};

struct kt_vma {
    uint64_t start, end, pgoff, dev, ino;
    uint32_t kind, flags;
};

/* One frame, decoded or to encode. `data` is the frame's variable part, pointing into the
 * decoded buffer (valid as long as it is): the inline struct of an IOCTL, the written-back
 * struct of a REPLY, READ_DATA's bytes, WRITE's data, VMAS_DATA's records, ERROR's message. */
struct kt_event {
    uint16_t type;
    uint16_t nfds;
    uint32_t id;
    union {
        struct { uint16_t major, minor; uint32_t flags; } hello;
        struct kt_hello_reply hello_reply;
        struct { uint32_t request, flags; uint64_t arg; } ioctl;
        struct { int64_t result; uint32_t err, flags; } reply;
        struct { uint64_t addr, size; } read;
        struct { uint64_t addr; } write;
        struct { uint64_t written; } write_done;
        struct { uint64_t start, end; } vmas;
        struct { uint32_t count, pad; } vmas_data;
        struct { uint32_t code; } error;
        struct { uint64_t addr, size; } window;   /* READ_WINDOW and WRITE_WINDOW */
        struct { uint64_t count; } window_done;
    } u;
    const uint8_t *data;
    size_t data_len;
};

/* Little-endian helpers. */
static inline uint16_t kt_get16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t kt_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t kt_get64(const uint8_t *p)
{
    return (uint64_t)kt_get32(p) | ((uint64_t)kt_get32(p + 4) << 32);
}
static inline void kt_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void kt_put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void kt_put64(uint8_t *p, uint64_t v)
{
    kt_put32(p, (uint32_t)v);
    kt_put32(p + 4, (uint32_t)(v >> 32));
}

const char *kt_type_name(unsigned type);

/* Does `role` receive frames of this type? (a client receives the daemon's, and vice versa) */
int kt_receives(enum kt_role role, unsigned type);
/* May frames of this type carry descriptors? (HELLO_REPLY, REPLY and VMAS_DATA) */
int kt_may_carry_fds(unsigned type);

/* Check the header at buf, in wire.py's order: length within [16, max_message], reserved 0,
 * a known type that `role` may receive, descriptors only where allowed (at most KT_MAX_FDS),
 * and exactly as many descriptors arrived with the frame's first byte (fds_at_start) as it
 * declares. Returns KT_NEED_DATA while fewer than 16 bytes are there, KT_VIOLATION with `why`
 * set, or KT_OK. The body is complete once `avail >= h->length`. */
int kt_decode_header(const uint8_t *buf, size_t avail, uint32_t max_message, enum kt_role role,
                     size_t fds_at_start, struct kt_header *h, const char **why);

/* Decode a whole frame (its header checked by kt_decode_header). KT_OK, or KT_VIOLATION with
 * `why` for a bad body. */
int kt_decode_body(const struct kt_header *h, const uint8_t *frame, struct kt_event *ev,
                   const char **why);

/* A stream reader, kvmtag.wire.Codec's reading half: bytes and descriptors in, events out.
 *
 * Descriptors arrive (SCM_RIGHTS) with the bytes of the sendmsg that carried them, and a Unix
 * stream socket never merges such a message with bytes sent before it: the descriptors of one
 * receive belong to the frame that starts at its first byte. Any other descriptor (on a frame
 * that starts elsewhere, that declares another count, or that may carry none) is a violation.
 * The reader only keeps descriptor numbers: closing strays is the caller's (kt_reader_take_fds).
 */
struct kt_mark {
    uint64_t offset; /* stream offset of the first byte received with these descriptors */
    int n;
    int fds[KT_MAX_FDS];
};

struct kt_reader {
    enum kt_role role;
    uint32_t max_message;
    uint8_t *buf;       /* received bytes [pos, len) not yet decoded (malloc'd, grown) */
    size_t cap, pos, len;
    uint64_t offset;    /* stream offset of buf[pos] */
    struct kt_mark marks[KT_MAX_MARKS];
    int nmarks;
};

void kt_reader_init(struct kt_reader *r, enum kt_role role, uint32_t max_message);
/* Free the buffer; descriptors still queued are the caller's to take first. */
void kt_reader_free(struct kt_reader *r);
/* Where the next received bytes go, with room for at least the frame being read (its header
 * first); *room is the space there. NULL if memory ran out. */
uint8_t *kt_reader_space(struct kt_reader *r, size_t *room);
/* n bytes were written at kt_reader_space(), nfds descriptors with them (one receive).
 * KT_OK, or KT_VIOLATION when too many receives with descriptors are queued (the fds were
 * still taken: kt_reader_take_fds returns them). */
int kt_reader_received(struct kt_reader *r, size_t n, const int *fds, int nfds, const char **why);
/* The next event: KT_OK with the frame's descriptors in fds[0..ev->nfds) (now the caller's),
 * KT_NEED_DATA, or KT_VIOLATION. ev->data points into the reader's buffer until its next use. */
int kt_reader_next(struct kt_reader *r, struct kt_event *ev, int *fds, const char **why);
/* Move every queued descriptor to out[0..max) (strays: the caller closes them); the count. */
int kt_reader_take_fds(struct kt_reader *r, int *out, int max);
/* Bytes received and not decoded yet. */
static inline size_t kt_reader_buffered(const struct kt_reader *r) { return r->len - r->pos; }

/* One VMAS_DATA record; `data` of a decoded VMAS_DATA holds u.vmas_data.count of them. */
void kt_decode_vma(const uint8_t *record, struct kt_vma *vma);
void kt_encode_vma(uint8_t *record, const struct kt_vma *vma);

/* The header and fixed body of ev (everything but ev->data) into `out`, which must hold
 * KT_HEADER_SIZE + 56 bytes; the header's length counts ev->data_len, so the caller can send
 * ev->data from where it is. Returns the bytes written, or 0 if the frame would be invalid
 * (an unknown type, descriptors where none may travel, longer than KT_MAX_MESSAGE_LIMIT: the
 * caller keeps its frames within the peer's max_message). */
size_t kt_encode_head(const struct kt_event *ev, uint8_t *out);

/* The whole frame into out[cap]: its length, or 0 if invalid or it does not fit. */
size_t kt_encode(const struct kt_event *ev, uint8_t *out, size_t cap);

#endif
