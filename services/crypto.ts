import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname } from 'node:path'

const VERSION = 'v1'

/**
 * AES-256-GCM with a random 96-bit nonce per value. The blob is `v1.<iv>.<tag>.<ciphertext>`
 * (base64url); the associated data binds a ciphertext to its tenant and name, so a row copied
 * to another tenant or name does not decrypt.
 */
export class SecretBox {
  constructor(private readonly key: Buffer) {
    if (key.length !== 32) throw new Error('secrets key must be 32 bytes')
  }

  seal(plaintext: string, context: string): string {
    const iv = randomBytes(12)
    const cipher = createCipheriv('aes-256-gcm', this.key, iv)
    cipher.setAAD(Buffer.from(context))
    const data = Buffer.concat([cipher.update(plaintext, 'utf8'), cipher.final()])
    return [VERSION, iv, cipher.getAuthTag(), data].map((p) => (typeof p === 'string' ? p : p.toString('base64url'))).join('.')
  }

  open(blob: string, context: string): string {
    const [version, iv, tag, data] = blob.split('.')
    if (version !== VERSION || !iv || !tag || data === undefined) throw new Error('unknown secret format')
    const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(iv, 'base64url'))
    decipher.setAAD(Buffer.from(context))
    decipher.setAuthTag(Buffer.from(tag, 'base64url'))
    return Buffer.concat([decipher.update(Buffer.from(data, 'base64url')), decipher.final()]).toString('utf8')
  }
}

/**
 * Reads a key kept in a file, creating the file (mode 0600, in a 0700 directory) with `make()`
 * the first time. `created` says whether this call made it.
 */
export function keyFile(file: string, make: () => string): { value: string; created: boolean } {
  let created = false
  if (!existsSync(file)) {
    mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
    try {
      writeFileSync(file, make(), { mode: 0o600, flag: 'wx' })
      created = true
    } catch (err) {
      // another replica or process created it first: use theirs
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
  }
  return { value: readFileSync(file, 'utf8').trim(), created }
}

/** SECRETS_KEY (hex) when set; otherwise a key file made once with mode 0600. */
export function loadSecretsKey(hexKey: string | undefined, file: string): Buffer {
  if (hexKey) return Buffer.from(hexKey, 'hex')
  return Buffer.from(keyFile(file, () => randomBytes(32).toString('hex')).value, 'hex')
}

/** The admin key used when API_KEY is unset: made once and kept in `file`, so it survives restarts. */
export function loadAdminKey(file: string): { key: string; created: boolean } {
  const { value, created } = keyFile(file, () => `oia_${randomBytes(24).toString('base64url')}`)
  if (!value) throw new Error(`${file} is empty: delete it to have a new admin key made, or set API_KEY`)
  return { key: value, created }
}
