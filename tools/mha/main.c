/*
 * main.c -- the `mha` command: dispatch to a subcommand.
 */
#include "cli.h"

int main(int argc, char **argv) { return mha_cli_main(argc, argv); }
