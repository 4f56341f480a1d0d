//! The CPL 0 entry stub, the static page tables and GDT, and the C memory
//! functions the compiler may call.
//!
//! The loader (grove-vmm or Firecracker) enters `_start` in 64-bit long mode with
//! its own identity page tables, interrupts off and RSI = boot_params. CPL 0 code
//! is emulated on the project's nested-KVM hosts (about 1.7 us per instruction
//! loop), so the stub has no loops: it only
//!   - loads a GDT with 64-bit user code/data segments and an empty IDT (limit 0,
//!     so any exception escalates to a triple fault, which the VMM reports),
//!   - enables SSE (CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR | OSXMMEXCPT), clears
//!     CR0.CD/NW and CR4.SMEP/SMAP (the stub itself runs from U = 1 pages),
//!   - loads CR3 with page tables that are static data of the image (identity map
//!     of 0..16 GiB with 2 MiB pages, U/S set at every level),
//!   - sets the user stack and `iretq`s to CPL 3 with RFLAGS.IOPL = 3, IF = 0.
//!
//! Everything else runs natively at CPL 3 in `crate::rust_main`.

use core::arch::global_asm;

// The page tables below map exactly `grove_testguest::MAPPED_BYTES` (16 GiB).
const _: () = assert!(grove_testguest::MAPPED_BYTES == 16 << 30);

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .type _start, @function
_start:
    lea rsp, [rip + boot_stack_top]
    lgdt [rip + gdt_ptr]
    lidt [rip + idt_ptr]

    /* CR4: +OSFXSR (bit 9) +OSXMMEXCPT (bit 10), -SMEP (bit 20) -SMAP (bit 21).
       PAE stays set (long mode). */
    mov rax, cr4
    or eax, 0x600
    and eax, 0xffcfffff
    mov cr4, rax

    /* CR0: -EM (bit 2) -NW (bit 29) -CD (bit 30), +MP (bit 1). PE/PG stay set. */
    mov rax, cr0
    and eax, 0x9ffffffb
    or eax, 0x2
    mov cr0, rax

    lea rax, [rip + tg_pml4]
    mov cr3, rax

    mov ax, 0x1b
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax

    /* iretq frame: SS, RSP, RFLAGS, CS, RIP. */
    push 0x1b
    lea rax, [rip + user_stack_top]
    push rax
    push 0x3002                 /* IOPL = 3, IF = 0, reserved bit 1 */
    push 0x23
    lea rax, [rip + tg_user_entry]
    push rax
    iretq

    .size _start, . - _start

    /* From here on: CPL 3, native. */
    .section .text.user_entry, "ax"
    .type tg_user_entry, @function
tg_user_entry:
    fninit
    ldmxcsr [rip + tg_mxcsr_default]
    mov rdi, rsi                /* boot_params address, preserved from entry */
    xor ebp, ebp
    call rust_main
    ud2
    .size tg_user_entry, . - tg_user_entry

    .section .rodata.tg_mxcsr, "a"
    .balign 4
tg_mxcsr_default:
    .long 0x1f80

    /* GDT: null, kernel code 64 (0x08), kernel data (0x10), user data (0x18),
       user code 64 (0x20). User selectors with RPL 3: data 0x1b, code 0x23. */
    .section .data.gdt, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
gdt_end:
    .balign 16
gdt_ptr:
    .short gdt_end - gdt - 1
    .quad gdt
    .balign 16
idt_ptr:
    .short 0
    .quad 0

    /* Page tables: PML4[0] -> PDPT, PDPT[0..16] -> 16 page directories of
       512 x 2 MiB pages each. 0x7 = P|RW|US, 0x87 = P|RW|US|PS. */
    .section .data.pagetables, "aw"
    .balign 4096
    .global tg_pml4
tg_pml4:
    .quad tg_pdpt + 0x7
    .fill 511, 8, 0
tg_pdpt:
    .set tg_i, 0
    .rept 16
    .quad tg_pd + (tg_i << 12) + 0x7
    .set tg_i, tg_i + 1
    .endr
    .fill 496, 8, 0
tg_pd:
    .set tg_i, 0
    .rept 8192
    .quad (tg_i << 21) | 0x87
    .set tg_i, tg_i + 1
    .endr

    .section .bss.stacks, "aw", @nobits
    .balign 4096
boot_stack:
    .skip 4096
boot_stack_top:
    .balign 4096
user_stack:
    .skip 262144
user_stack_top:

    /* C memory functions (compiler_builtins does not provide them on this
       target). They only run at CPL 3. */
    .section .text.tg_mem, "ax"
    .global memcpy
    .type memcpy, @function
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret
    .size memcpy, . - memcpy

    .global memmove
    .type memmove, @function
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 2f
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
2:
    rep movsb
    ret
    .size memmove, . - memmove

    .global memset
    .type memset, @function
memset:
    mov r9, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r9
    ret
    .size memset, . - memset

    .global memcmp
    .type memcmp, @function
    .global bcmp
    .type bcmp, @function
memcmp:
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 3f
    mov rcx, rdx
    repe cmpsb
    je 3f
    movzx eax, byte ptr [rdi - 1]
    movzx ecx, byte ptr [rsi - 1]
    sub eax, ecx
3:
    ret
    .size memcmp, . - memcmp
"#
);
