/**
 * `npm run bench` runs every bench/*.bench.ts in turn; `npm run bench -- http` runs only the
 * named ones. Flags of the form `--name=value` are left in process.argv for the benchmarks
 * (`--streams=N`, `--sessions=N`). Exits 1 when a benchmark fails to run or misses its target.
 */
import { readdirSync } from 'node:fs'
import type { BenchResult } from './lib.js'

const SUFFIX = '.bench.ts'
const dir = new URL('.', import.meta.url)
const available = readdirSync(dir)
  .filter((f) => f.endsWith(SUFFIX))
  .map((f) => f.slice(0, -SUFFIX.length))
  .sort()

const wanted = process.argv.slice(2).filter((arg) => !arg.startsWith('--'))
const unknown = wanted.filter((name) => !available.includes(name))
if (unknown.length > 0) {
  console.error(`unknown benchmark ${unknown.join(', ')}; available: ${available.join(', ')}`)
  process.exit(1)
}

const results: { name: string; result?: BenchResult; error?: Error }[] = []
for (const name of wanted.length > 0 ? wanted : available) {
  console.log(`\n==== bench: ${name} ====`)
  try {
    const mod = (await import(new URL(`${name}${SUFFIX}`, dir).href)) as { default: () => Promise<BenchResult> }
    results.push({ name, result: await mod.default() })
  } catch (err) {
    console.error(err)
    results.push({ name, error: err as Error })
  }
}

console.log('\n==== summary ====')
for (const { name, result, error } of results) console.log(`${name}: ${error ? `FAILED (${error.message})` : result!.summary}`)
process.exitCode = results.every((r) => r.result?.met) ? 0 : 1
