#!/usr/bin/env node
// Compiles the Veil Solidity sources with the exact solc pinned in package-lock.json and writes
// one artifact per contract to artifacts/<Name>.json (ABI, creation and runtime bytecode, compiler
// version and settings). The metadata hash is off, so the same source and compiler always give
// the same bytes.
//
// Usage (from contracts/, after `npm ci`):
//   node scripts/compile.mjs           write the artifacts
//   node scripts/compile.mjs --check   exit 1 if the committed artifacts differ from a fresh compile
import { readFileSync, writeFileSync, existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const solc = require("solc");

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const CONTRACTS = [{ file: "sol/VeilAcl.sol", name: "VeilAcl" }];

// Fixed compiler settings. Changing any of them changes the artifact, and CI notices.
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  viaIR: false,
  metadata: { bytecodeHash: "none", appendCBOR: false },
  outputSelection: {
    "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
  },
};

const check = process.argv.includes("--check");
const unknown = process.argv.slice(2).filter((a) => a !== "--check");
if (unknown.length > 0) {
  console.error(`usage: node scripts/compile.mjs [--check] (unknown: ${unknown.join(" ")})`);
  process.exit(2);
}

const sources = {};
for (const c of CONTRACTS) {
  sources[c.file] = { content: readFileSync(join(root, c.file), "utf8") };
}
const input = { language: "Solidity", sources, settings: SETTINGS };
const output = JSON.parse(solc.compile(JSON.stringify(input)));

const problems = output.errors ?? [];
for (const p of problems) {
  console.error(p.formattedMessage ?? p.message);
}
// Warnings are errors too: the contract must compile cleanly.
if (problems.length > 0) {
  console.error(`solc reported ${problems.length} problem(s)`);
  process.exit(1);
}

const version = solc.version();
let stale = 0;
for (const c of CONTRACTS) {
  const out = output.contracts[c.file][c.name];
  const artifact = {
    contractName: c.name,
    sourceName: c.file,
    compiler: { name: "solc", version, settings: { ...SETTINGS, outputSelection: undefined } },
    abi: out.abi,
    bytecode: "0x" + out.evm.bytecode.object,
    deployedBytecode: "0x" + out.evm.deployedBytecode.object,
  };
  const text = JSON.stringify(artifact, null, 2) + "\n";
  const path = join(root, "artifacts", `${c.name}.json`);
  if (check) {
    const current = existsSync(path) ? readFileSync(path, "utf8") : null;
    if (current !== text) {
      console.error(
        `artifacts/${c.name}.json is ${current === null ? "missing" : "out of date"}: ` +
          "run `node scripts/compile.mjs` in contracts/ and commit the result",
      );
      stale++;
    } else {
      console.log(`artifacts/${c.name}.json is up to date (solc ${version})`);
    }
  } else {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, text);
    console.log(`wrote artifacts/${c.name}.json (solc ${version})`);
  }
}
process.exit(stale === 0 ? 0 : 1);
