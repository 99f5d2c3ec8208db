/* Shared protocol test vectors: the shim's own codec (wire.c) and ioctl table (ioctls.h),
 * driven line by line from stdin by tests/test_preload.py, which holds kvmtag/wire.py's side.
 *
 *   feed ROLE CHUNKS       receives (CHUNKS: HEX[:NFDS],...) fed to a reader for ROLE
 *                          (client: the daemon's frames; daemon: the client's); prints
 *                          "ok FIELDS reencoded=HEX" per event, then
 *                          "need_data buffered=N pending_fds=N" or "violation WHY"
 *   samples                frames encoded here from built-in events: "sample FIELDS frame=HEX"
 *   ioctls                 the ioctl table: "ioctl NUMBER ARG SIZE CREATES NAME"
 *
 * FIELDS are key=value, integers in decimal, bytes in hex; test_preload.py renders wire.py's
 * events the same way, so each side checks the other's encoding and decoding. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../ioctls.h"
#include "../wire.h"

static void print_hex(const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        putchar(digits[p[i] >> 4]);
        putchar(digits[p[i] & 15]);
    }
}

static void print_fields(const struct kt_event *ev)
{
    printf("type=%s id=%" PRIu32 " nfds=%u", kt_type_name(ev->type), ev->id, ev->nfds);
    switch (ev->type) {
    case KT_HELLO:
        printf(" major=%u minor=%u flags=%" PRIu32, ev->u.hello.major, ev->u.hello.minor,
               ev->u.hello.flags);
        return;
    case KT_HELLO_REPLY: {
        const struct kt_hello_reply *r = &ev->u.hello_reply;
        printf(" major=%u minor=%u fd_kind=%" PRIu32 " page_size=%" PRIu32 " max_message=%" PRIu32
               " max_fds=%" PRIu32 " window=%" PRIu32 " errno=%" PRIu32 " extensions=%" PRIu64
               " profile=", r->major, r->minor, r->fd_kind, r->page_size, r->max_message,
               r->max_fds, r->window, r->err, r->extensions);
        print_hex((const uint8_t *)r->profile, 16);
        return;
    }
    case KT_IOCTL:
        printf(" request=%" PRIu32 " flags=%" PRIu32 " arg=%" PRIu64, ev->u.ioctl.request,
               ev->u.ioctl.flags, ev->u.ioctl.arg);
        break;
    case KT_REPLY:
        printf(" result=%" PRId64 " errno=%" PRIu32 " flags=%" PRIu32, ev->u.reply.result,
               ev->u.reply.err, ev->u.reply.flags);
        break;
    case KT_READ:
        printf(" addr=%" PRIu64 " size=%" PRIu64, ev->u.read.addr, ev->u.read.size);
        return;
    case KT_READ_DATA:
        break;
    case KT_WRITE:
        printf(" addr=%" PRIu64, ev->u.write.addr);
        break;
    case KT_WRITE_DONE:
        printf(" written=%" PRIu64, ev->u.write_done.written);
        return;
    case KT_VMAS:
        printf(" start=%" PRIu64 " end=%" PRIu64, ev->u.vmas.start, ev->u.vmas.end);
        return;
    case KT_VMAS_DATA:
        printf(" count=%" PRIu32, ev->u.vmas_data.count);
        for (uint32_t i = 0; i < ev->u.vmas_data.count; i++) {
            struct kt_vma v;
            kt_decode_vma(ev->data + (size_t)i * KT_VMA_RECORD_SIZE, &v);
            printf(" vma%" PRIu32 "=%" PRIu64 ",%" PRIu64 ",%" PRIu64 ",%" PRIu64 ",%" PRIu64
                   ",%" PRIu32 ",%" PRIu32, i, v.start, v.end, v.pgoff, v.dev, v.ino, v.kind, v.flags);
        }
        return;
    case KT_ERROR:
        printf(" code=%" PRIu32, ev->u.error.code);
        break;
    case KT_READ_WINDOW:
    case KT_WRITE_WINDOW:
        printf(" addr=%" PRIu64 " size=%" PRIu64, ev->u.window.addr, ev->u.window.size);
        return;
    case KT_WINDOW_DONE:
        printf(" count=%" PRIu64, ev->u.window_done.count);
        return;
    }
    printf(" data=");
    print_hex(ev->data, ev->data_len);
}

static int nibble(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c - 'A' + 10;
}

static uint8_t *from_hex(const char *hex, size_t *n)
{
    size_t len = strlen(hex) / 2;
    uint8_t *out = malloc(len + 1);
    for (size_t i = 0; i < len; i++)
        out[i] = (uint8_t)(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
    *n = len;
    return out;
}

/* Feed receives to a reader as wire.py's Codec would get them, and print every event that
 * comes out, then how it stopped (need_data or violation). chunks: "HEX[:NFDS],HEX[:NFDS],..."
 * (descriptor numbers are made up: nothing is closed here). */
static void feed(const char *role_name, char *chunks)
{
    enum kt_role role = !strcmp(role_name, "daemon") ? KT_ROLE_DAEMON : KT_ROLE_CLIENT;
    struct kt_reader r;
    struct kt_event ev;
    const char *why = "";
    int fds[KT_MAX_MARKS * KT_MAX_FDS], fake[KT_MAX_FDS], rc = KT_NEED_DATA;
    uint8_t *again = malloc(KT_MAX_MESSAGE_LIMIT);

    for (int i = 0; i < KT_MAX_FDS; i++)
        fake[i] = 1000 + i;
    kt_reader_init(&r, role, KT_MAX_MESSAGE);
    for (char *chunk = strtok(chunks, ","); chunk; chunk = strtok(NULL, ",")) {
        char *colon = strchr(chunk, ':');
        int nfds = 0;
        size_t n, room, done = 0;
        uint8_t *bytes;
        if (colon) {
            *colon = 0;
            nfds = atoi(colon + 1);
        }
        bytes = from_hex(chunk, &n);
        /* One receive per chunk where the reader has room (it makes room for a whole frame);
         * the descriptors come with the chunk's first byte. */
        do {
            uint8_t *space = kt_reader_space(&r, &room);
            size_t step = n - done < room ? n - done : room;
            memcpy(space, bytes + done, step);
            rc = kt_reader_received(&r, step, fake, done == 0 ? nfds : 0, &why);
            done += step;
        } while (rc == KT_OK && done < n);
        free(bytes);
        if (rc == KT_VIOLATION)
            break;
        /* As a Codec's user does: every complete event after each receive. */
        while ((rc = kt_reader_next(&r, &ev, fds, &why)) == KT_OK) {
            size_t m = kt_encode(&ev, again, KT_MAX_MESSAGE_LIMIT);
            printf("ok ");
            print_fields(&ev);
            printf(" reencoded=");
            print_hex(again, m);
            printf("\n");
        }
        if (rc == KT_VIOLATION)
            break;
    }
    if (rc == KT_VIOLATION)
        printf("violation %s\n", why);
    else
        printf("need_data buffered=%zu pending_fds=%d\n", kt_reader_buffered(&r),
               kt_reader_take_fds(&r, fds, KT_MAX_MARKS * KT_MAX_FDS));
    kt_reader_free(&r);
    free(again);
}

static void sample(const struct kt_event *ev)
{
    uint8_t *frame = malloc(KT_MAX_MESSAGE);
    size_t n = kt_encode(ev, frame, KT_MAX_MESSAGE);
    printf("sample ");
    print_fields(ev);
    printf(" frame=");
    print_hex(frame, n);
    printf("\n");
    free(frame);
}

static void samples(void)
{
    static const uint8_t copy_tags[48] = { 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0,
                                           0x78, 0x56, 0x34, 0x12, 0xff, 0x7f, 0, 0, 1 };
    static const uint8_t written[32] = { 0xaa, 0xbb, 5, 0, 0, 0, 0, 0, 1 };
    static uint8_t window[KT_WINDOW];
    struct kt_event ev;
    uint8_t records[3 * KT_VMA_RECORD_SIZE];
    const struct kt_vma vmas[3] = {
        { 0x7f0000000000, 0x7f0000100000, 0x2000, 0x1a, 77, KT_VMA_SHMEM,
          KT_VMA_SHARED | KT_VMA_WRITABLE | KT_VMA_HAS_FD | KT_VMA_READABLE },
        { 0x7f0000100000, 0x7f0000101000, 0, 0, 0, KT_VMA_ANON, KT_VMA_WRITABLE | KT_VMA_READABLE },
        { 0x7f0000200000, 0x7f0000400000, 0, 0x2b, 78, KT_VMA_HUGETLBFS,
          KT_VMA_SHARED | KT_VMA_HAS_FD },
    };

    for (size_t i = 0; i < sizeof window; i++)
        window[i] = (uint8_t)(i * 7 % 16);
    ev = (struct kt_event){ .type = KT_HELLO, .id = 1 };
    ev.u.hello.major = 1;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_HELLO_REPLY, .id = 1 };
    ev.u.hello_reply = (struct kt_hello_reply){ 1, 0, KT_FD_VCPU, 65536, KT_MAX_MESSAGE, 32,
                                                KT_WINDOW, 0, 0x8000000000000001ull, "6.12" };
    sample(&ev);
    ev = (struct kt_event){ .type = KT_IOCTL, .id = 2 };
    ev.u.ioctl.request = 0xAE03;
    ev.u.ioctl.arg = 205;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_IOCTL, .id = 0xfffffffe, .data = copy_tags, .data_len = 48 };
    ev.u.ioctl.request = 0x8030AEB4;
    ev.u.ioctl.flags = KT_IOCTL_INLINE;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_IOCTL, .id = 3, .data = written, .data_len = 32 };
    ev.u.ioctl.request = 0x8020AEAF;
    ev.u.ioctl.flags = KT_IOCTL_INLINE | KT_IOCTL_INLINE_WRITABLE;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_IOCTL, .id = 4 };
    ev.u.ioctl.request = 0x4020AE46;
    ev.u.ioctl.arg = 0xffffffffffffffffull;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_REPLY, .id = 5, .nfds = 2 };
    ev.u.reply.result = 0;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_REPLY, .id = 6 };
    ev.u.reply.result = -1;
    ev.u.reply.err = 14;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_REPLY, .id = 7, .data = written, .data_len = 32 };
    ev.u.reply.result = 0x7fffffff;
    ev.u.reply.flags = KT_REPLY_WRITTEN_BACK;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_READ, .id = 8 };
    ev.u.read.addr = 0x7ffc00001000;
    ev.u.read.size = KT_WINDOW;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_READ_DATA, .id = 8, .data = window, .data_len = KT_WINDOW };
    sample(&ev);
    ev = (struct kt_event){ .type = KT_READ_DATA, .id = 8 };
    sample(&ev);
    ev = (struct kt_event){ .type = KT_WRITE, .id = 9, .data = window, .data_len = 4096 };
    ev.u.write.addr = 0xffffffffffffffffull;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_WRITE_DONE, .id = 9 };
    ev.u.write_done.written = 4095;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_VMAS, .id = 10 };
    ev.u.vmas.start = 0x1000;
    ev.u.vmas.end = 0x7fffffffffff;
    sample(&ev);
    for (int i = 0; i < 3; i++)
        kt_encode_vma(records + i * KT_VMA_RECORD_SIZE, &vmas[i]);
    ev = (struct kt_event){ .type = KT_VMAS_DATA, .id = 10, .nfds = 2, .data = records,
                            .data_len = sizeof records };
    ev.u.vmas_data.count = 3;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_VMAS_DATA, .id = 11 };
    sample(&ev);
    ev = (struct kt_event){ .type = KT_ERROR, .id = 0, .data = (const uint8_t *)"bad frame", .data_len = 9 };
    ev.u.error.code = 71;
    sample(&ev);
    /* 1.1: the shared window. */
    ev = (struct kt_event){ .type = KT_HELLO, .id = 12 };
    ev.u.hello.major = KT_VERSION_MAJOR;
    ev.u.hello.minor = KT_VERSION_MINOR;
    ev.u.hello.flags = KT_HELLO_SHARED_WINDOW;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_HELLO_REPLY, .id = 12, .nfds = 1 };
    ev.u.hello_reply = (struct kt_hello_reply){ 1, 1, KT_FD_VM, 4096, KT_MAX_MESSAGE, 32,
                                                KT_WINDOW, 0, 1, "latest" };
    sample(&ev);
    ev = (struct kt_event){ .type = KT_READ_WINDOW, .id = 13 };
    ev.u.window.addr = 0x7ffc00001000;
    ev.u.window.size = KT_WINDOW;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_READ_WINDOW, .id = 0xffffffff };
    ev.u.window.addr = 0xffffffffffffffffull;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_WRITE_WINDOW, .id = 14 };
    ev.u.window.addr = 0x1000;
    ev.u.window.size = 0xffffffffffffffffull;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_WINDOW_DONE, .id = 13 };
    ev.u.window_done.count = 4095;
    sample(&ev);
    ev = (struct kt_event){ .type = KT_WINDOW_DONE, .id = 14 };
    ev.u.window_done.count = 0xffffffffffffffffull;
    sample(&ev);
}

int main(void)
{
    static char line[4 * KT_MAX_MESSAGE + 4096];
    static const char *const args[] = { "none", "int", "in", "out", "inout" };

    setvbuf(stdout, NULL, _IOFBF, 1 << 20);
    while (fgets(line, sizeof line, stdin)) {
        char command[16], role[16];
        int at;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "%15s", command) != 1)
            continue;
        if (!strcmp(command, "feed") && sscanf(line, "feed %15s %n", role, &at) == 1) {
            feed(role, line + at);
        } else if (!strcmp(command, "samples")) {
            samples();
        } else if (!strcmp(command, "ioctls")) {
            for (size_t i = 0; i < KT_NIOCTLS; i++)
                printf("ioctl %" PRIu32 " %s %" PRIu32 " %d %s\n", kt_ioctls[i].number,
                       args[kt_ioctls[i].arg], kt_ioctls[i].size, kt_ioctls[i].creates, kt_ioctls[i].name);
        } else {
            printf("error unknown command %s\n", command);
        }
        printf("end\n");
        fflush(stdout);
    }
    return 0;
}
