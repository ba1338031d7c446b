/* duet-check: validates a build against reference data nobody here wrote.
 * Dispatches to the subcommands declared in check.h. */
#include <stdio.h>
#include <string.h>

#include "check.h"

static void usage(FILE *f) {
    fprintf(f, "usage: duet-check golden [options] CASE_DIR\n"
               "       duet-check tokenizer TOKENIZER_DIR CASES_JSON VARIANT\n"
               "       duet-check chat TOKENIZER_DIR CASES_JSON\n"
               "Run a subcommand with --help for its options.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "golden")) return check_golden_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenizer")) return check_tokenizer_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "chat")) return check_chat_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "duet-check: unknown subcommand '%s'\n", cmd);
    usage(stderr);
    return 2;
}
