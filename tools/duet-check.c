/* duet-check: validates a build against reference data nobody here wrote, and plans a
 * deployment's memory without a GPU (plan).
 * Dispatches to the subcommands declared in check.h; each parses its own options (base/opt.h),
 * and this program's own --help lists them. */
#include <stdio.h>
#include <string.h>

#include "base/opt.h"
#include "check.h"

typedef struct subcommand {
    const char *name;
    int (*run)(int argc, char **argv);
} subcommand;

static const subcommand g_subcommands[] = {
    {"golden", check_golden_main},
    {"tokenizer", check_tokenizer_main},
    {"chat", check_chat_main},
    {"plan", check_plan_main},
};

int main(int argc, char **argv) {
    /* "duet-check SUBCOMMAND ...": the rest of the line is the subcommand's */
    if (argc >= 2 && argv[1][0] != '-') {
        for (size_t i = 0; i < sizeof g_subcommands / sizeof g_subcommands[0]; i++)
            if (!strcmp(argv[1], g_subcommands[i].name))
                return g_subcommands[i].run(argc - 1, argv + 1);
        fprintf(stderr, "duet-check: unknown subcommand '%s' (golden, tokenizer, chat or plan)\n",
                argv[1]);
        return 2;
    }
    opt_parser *p;
    if (opt_parser_create("duet-check", "{golden,tokenizer,chat,plan} [options] ARGUMENTS...",
                          "Checks a build against reference data: 'golden [options] CASE_DIR' "
                          "compares the model's logits and greedy ids with the transformers "
                          "reference; 'tokenizer TOKENIZER_DIR CASES_JSON VARIANT' and 'chat "
                          "TOKENIZER_DIR CASES_JSON' compare the tokenizer and the chat template "
                          "with the tokenizers reference; 'plan --model DIR --gpu-memory SIZE' "
                          "prints the memory plan of a layout without a GPU. 'duet-check "
                          "SUBCOMMAND --help' lists a "
                          "subcommand's options.",
                          &p) != DUET_OK)
        return 1;
    int rc = opt_parse(p, argc, argv);
    opt_parser_destroy(p);
    if (rc) return rc == 1 ? 0 : 2;
    fprintf(stderr, "duet-check: a subcommand is required: golden, tokenizer, chat or plan (see "
                    "--help)\n");
    return 2;
}
