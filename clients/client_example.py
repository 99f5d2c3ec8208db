"""A VMM-style script against kvmtagd: packs its own structs and uses only
kvmtag.client.open / ioctl / close, exactly as it would use /dev/kvm with os.open and
fcntl.ioctl.

Run (with kvmtagd running): .venv/bin/python clients/client_example.py [SOCKET]
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import sys

from kvmtag import client

KVM_CREATE_VM = 0xAE01
KVM_ENABLE_CAP = 0x4068AEA3
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_ARM_MTE_COPY_TAGS = 0x8030AEB4
KVM_CAP_ARM_MTE = 205
TO_GUEST, FROM_GUEST = 0, 1
RAM, IPA = 64 << 20, 0x8000_0000

kvm = client.open("/dev/kvm", socket=sys.argv[1] if len(sys.argv) > 1 else None)
vm = client.ioctl(kvm, KVM_CREATE_VM, 0)
client.ioctl(vm, KVM_ENABLE_CAP, struct.pack("<II4Q64x", KVM_CAP_ARM_MTE, 0, 0, 0, 0, 0))

# Guest RAM: a memfd mapped shared, so kvmtagd can reach it too.
memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
os.ftruncate(memfd, RAM)
ram = mmap.mmap(memfd, RAM)
ram_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
client.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, IPA, RAM, ram_addr))

tags = bytearray(i % 16 for i in range(RAM // 16))  # one tag per 16-byte granule
tags_addr = ctypes.addressof(ctypes.c_char.from_buffer(tags))
copied = client.ioctl(
    vm, KVM_ARM_MTE_COPY_TAGS, struct.pack("<QQQQ2Q", IPA, RAM, tags_addr, TO_GUEST, 0, 0)
)
print(f"TO_GUEST: {copied} bytes of guest RAM tagged")

back = bytearray(len(tags))
back_addr = ctypes.addressof(ctypes.c_char.from_buffer(back))
copied = client.ioctl(
    vm, KVM_ARM_MTE_COPY_TAGS, struct.pack("<QQQQ2Q", IPA, RAM, back_addr, FROM_GUEST, 0, 0)
)
print(f"FROM_GUEST: {copied} bytes, tags intact: {back == tags}")

try:  # a misaligned length: the kernel's EINVAL, as an OSError
    client.ioctl(vm, KVM_ARM_MTE_COPY_TAGS, struct.pack("<QQQQ2Q", IPA, 100, back_addr, 1, 0, 0))
except OSError as e:
    print(f"misaligned length: {errno.errorcode[e.errno]}")

client.close(vm)
client.close(kvm)
