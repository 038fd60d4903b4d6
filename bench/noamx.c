/* Denies AMX to the process it is preloaded into, as a Linux without AMX support (or a
 * VM that does not expose it) would: Linux grants AMX's tile state only to a process
 * that asks with arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and streambed,
 * ONNX Runtime (MLAS) and oneDNN all ask through libc's syscall() and fall back to
 * AVX-512 VNNI / FMA kernels when refused. bench/compare.sh builds it for NO_AMX=1, so
 * an Intel Xeon with AMX also times the paths of one without (issue #16). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>

#define ARCH_REQ_XCOMP_PERM 0x1023

long syscall(long number, ...) {
    va_list ap;
    long arg[6];
    va_start(ap, number);
    for (int i = 0; i < 6; i++)
        arg[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_arch_prctl && arg[0] == ARCH_REQ_XCOMP_PERM) {
        errno = EPERM;
        return -1;
    }
    static long (*next)(long, ...);
    if (!next)
        next = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return next(number, arg[0], arg[1], arg[2], arg[3], arg[4], arg[5]);
}
