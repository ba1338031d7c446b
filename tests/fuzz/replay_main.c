/* Runs a fuzz driver over every file of a corpus directory, for builds without libFuzzer (gcc):
 * CI still replays the checked-in corpus and the crashes found so far as a normal test. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "base/fileio.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    DIR *d = opendir(argv[1]);
    if (!d) {
        perror(argv[1]);
        return 1;
    }
    int runs = 0, failed = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", argv[1], e->d_name);
        fio_map m;
        if (fio_map_file(path, &m) != DUET_OK) {
            failed++;
            continue;
        }
        LLVMFuzzerTestOneInput(m.data, m.size);
        fio_unmap(&m);
        runs++;
    }
    closedir(d);
    fprintf(stderr, "replayed %d inputs, %d unreadable\n", runs, failed);
    return failed || runs == 0 ? 1 : 0;
}
