/* Placeholder until the tokenizer lands (removed by the merge that adds check_tok.c). */
#include <stdio.h>

#include "check.h"

int check_tokenizer_main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "duet-check tokenizer: not built\n");
    return 2;
}

int check_chat_main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "duet-check chat: not built\n");
    return 2;
}
