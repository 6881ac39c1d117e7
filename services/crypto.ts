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

/** SECRETS_KEY (hex) when set; otherwise a key file made once with mode 0600. */
export function loadSecretsKey(hexKey: string | undefined, keyFile: string): Buffer {
  if (hexKey) return Buffer.from(hexKey, 'hex')
  if (!existsSync(keyFile)) {
    mkdirSync(dirname(keyFile), { recursive: true, mode: 0o700 })
    try {
      writeFileSync(keyFile, randomBytes(32).toString('hex'), { mode: 0o600, flag: 'wx' })
    } catch (err) {
      // another replica or process created it first: use theirs
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
  }
  return Buffer.from(readFileSync(keyFile, 'utf8').trim(), 'hex')
}
