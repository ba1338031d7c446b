/* Runs duet-check's tokenizer and chat subcommands (tools/check_tok.c) as meson tests, until
 * they are linked into duet-check itself. Usage: run_check_tok tokenizer|chat ARGS... */
#include <stdio.h>
#include <string.h>

#include "check.h"

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "tokenizer")) return check_tokenizer_main(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "chat")) return check_chat_main(argc - 1, argv + 1);
    fprintf(stderr, "usage: run_check_tok tokenizer|chat ARGS...\n");
    return 2;
}
