/* Runs a GPU test command only where enough CUDA devices exist: gpu_guard N CMD [ARGS...]
 * exits 77 (meson's "skipped") when fewer than N are visible, else becomes CMD. Lets the
 * golden and multi-GPU tests sit in the gpu suite on machines without a GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "model/backends/cuda/backend_cuda.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: gpu_guard N CMD [ARGS...]\n");
        return 2;
    }
    int need = atoi(argv[1]), have = be_cuda_device_count();
    if (have < need) {
        fprintf(stderr, "gpu_guard: %d CUDA device(s), %d needed: skipped\n", have, need);
        return 77;
    }
    execvp(argv[2], argv + 2);
    perror(argv[2]);
    return 127;
}
