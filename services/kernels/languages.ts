import { execFile } from 'node:child_process'
import type { KernelManagerOptions, Language, LanguageInfo } from './types.js'

// The one table of names for the kernels' languages: POST /execute, the agent's tool calls and
// fenced code, and GET /v1/languages all use it. Aliases are the names models and clients write
// (fence tags, Open Interpreter's language names).
const ALIASES: Record<Language, string[]> = {
  python: ['py', 'python3'],
  shell: ['bash', 'sh', 'zsh'],
  javascript: ['js', 'node', 'nodejs'],
}

export const LANGUAGES = Object.keys(ALIASES) as Language[]

/** The language a name means, case and surrounding blanks aside; undefined for any other name. */
export function resolveLanguage(name: string): Language | undefined {
  const wanted = name.trim().toLowerCase()
  return LANGUAGES.find((language) => language === wanted || ALIASES[language].includes(wanted))
}

const VERSION_PATTERN = /(\d+\.\d+(?:\.\d+)?)/

function versionOf(bin: string): Promise<string | null> {
  return new Promise((resolve) => {
    execFile(bin, ['--version'], { timeout: 10_000, env: { PATH: process.env.PATH ?? '/usr/bin:/bin' } }, (err, stdout, stderr) => {
      if (err) return resolve(null)
      // bash puts its version on the first line of a long text.
      const match = VERSION_PATTERN.exec(`${stdout}\n${stderr}`.trim().split('\n')[0] ?? '')
      resolve(match?.[1] ?? null)
    })
  })
}

export async function detectLanguages(opts: Pick<KernelManagerOptions, 'pythonBin' | 'bashBin' | 'nodeBin'>): Promise<LanguageInfo[]> {
  const bins: Record<Language, string> = { python: opts.pythonBin, shell: opts.bashBin, javascript: opts.nodeBin }
  return Promise.all(
    LANGUAGES.map(async (name) => {
      const version = await versionOf(bins[name])
      return { name, aliases: ALIASES[name], version, available: version !== null }
    }),
  )
}
