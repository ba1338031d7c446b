/* Fuzz driver for deploy/launch's description parser (a user's file): any bytes give a
 * description, its model check and its plan with every command line, or one error line. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "desc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[512];
    dl_desc *d = NULL;
    if (dl_desc_parse((const char *)data, size, &d, err, sizeof err) != DUET_OK) return 0;
    /* DeepSeek-V3's dimensions, then a tiny model's */
    const dl_model_shape shapes[] = {{128, 18432, 2048, 1, 256}, {8, 256, 64, 1, 16}};
    for (int i = 0; i < 2; i++)
        (void)dl_desc_check_model(d, &shapes[i], "config.json", err, sizeof err);
    const dl_paths paths = {.prefill = "/b/duet-prefill",
                            .decode = "/b/duet-decode",
                            .proxy = "/b/duet-proxy",
                            .agent = "/b/duet-mpi-agent"};
    dl_plan *p = NULL;
    if (dl_plan_create(d, &paths, &p) == DUET_OK) {
        for (int i = 0; i < p->n_cmds; i++) free(dl_cmd_line(&p->cmds[i]));
        dl_plan_destroy(p);
    }
    dl_desc_destroy(d);
    return 0;
}
