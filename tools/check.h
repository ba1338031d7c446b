/* Subcommands of duet-check, each in its own file: golden (model logits against the
 * transformers reference), tokenizer and chat (tokenizer.json and chat template against the
 * tokenizers reference), each printing a final line "N passed, N failed"; and plan (the memory
 * plan of a layout, without a GPU). Each returns the process exit status. */
#ifndef DUET_TOOLS_CHECK_H
#define DUET_TOOLS_CHECK_H

int check_golden_main(int argc, char **argv);
int check_tokenizer_main(int argc, char **argv);
int check_chat_main(int argc, char **argv);
int check_plan_main(int argc, char **argv); /* exit 0: fits, 1: does not, 2: bad input */

#endif
