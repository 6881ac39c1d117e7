import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

/** The package version, read once from the package.json above this file (source or dist). */
function readVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    try {
      return JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')).version
    } catch {
      const parent = dirname(dir)
      if (parent === dir) return '0.0.0'
      dir = parent
    }
  }
}

export const VERSION = readVersion()
