/*
 * raw-ref: the floor Ferrite is measured against. A minimal single-threaded KVM
 * loop with nothing but the ioctls: one memory slot, one vCPU in real mode at
 * CS=0x1000, IP=0 with a flat image at 0x10000 (Ferrite's flat-binary convention).
 * Port 0xf4 writes end it with status 32 + v (as ferrite --debug-exit), HLT with 0, other PIO and MMIO
 * exits are ignored (reads return all ones, as in Ferrite).
 *
 * usage: raw-ref IMAGE MEM_MIB
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IMAGE MEM_MIB\n", argv[0]);
        return 1;
    }
    size_t mem_size = (size_t)atoi(argv[2]) << 20;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    int img = open(argv[1], O_RDONLY);
    if (img < 0) die(argv[1]);
    struct stat st;
    if (fstat(img, &st) < 0) die("fstat");
    if (st.st_size > (off_t)(mem_size - 0x10000)) { fprintf(stderr, "image too large\n"); return 1; }
    if (read(img, mem + 0x10000, st.st_size) != st.st_size) die("read image");
    close(img);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (int i = 0; i < 6; i++) { segs[i]->selector = 0x1000; segs[i]->base = 0x10000; }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0, .rsp = 0xfff0, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0xf4)
                return 32 + data[0];
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset(data, 0xff, (size_t)run->io.size * run->io.count);
            break;
        }
        case KVM_EXIT_MMIO:
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, run->mmio.len);
            break;
        case KVM_EXIT_HLT:
            return 0;
        default:
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
}
