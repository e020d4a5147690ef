// Bundles src/ into ../ember/server/static/ (committed: installing ember runs no build).
// The same lockfile gives the same bytes: run ./build.sh and `git diff` shows nothing.
import { copyFile, mkdir, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as esbuild from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));
const source = path.join(here, 'src');
// `node build.mjs [DIR]`: DIR (default ember/server/static) receives the files; tests build elsewhere to compare.
const output = process.argv[2] ? path.resolve(process.argv[2]) : path.join(here, '..', 'ember', 'server', 'static');

await mkdir(output, { recursive: true });
for (const name of await readdir(output)) await rm(path.join(output, name), { recursive: true });

const common = { bundle: true, minify: true, legalComments: 'eof', logLevel: 'warning', charset: 'utf8' };
await esbuild.build({
  ...common,
  entryPoints: [path.join(source, 'main.js')],
  outfile: path.join(output, 'app.js'),
  format: 'esm',
  target: ['es2020', 'chrome100', 'firefox100', 'safari15'],
});
await esbuild.build({
  ...common,
  entryPoints: [path.join(source, 'style.css')],
  outfile: path.join(output, 'app.css'),
  target: ['chrome100', 'firefox100', 'safari15'],
});
for (const name of ['index.html', 'favicon.svg']) await copyFile(path.join(source, name), path.join(output, name));
console.log(`built ${path.relative(process.cwd(), output)}`);
