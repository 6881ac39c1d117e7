import { closeSync, constants, mkdirSync, openSync, writeFileSync } from 'node:fs'

/** 0xff 0xfe: not UTF-8, so only a Buffer path can name such a file (kernel code can make one). */
export const RAW = Buffer.from([0xff, 0xfe])

/** `dir/name/…` as bytes, so that names which are not UTF-8 survive. */
export const rawPath = (dir: string, ...names: (string | Buffer)[]) =>
  Buffer.concat([Buffer.from(dir), ...names.flatMap((name) => [Buffer.from('/'), Buffer.from(name)])])

/** `depth` nested directories `d` below `dir` and leaf.txt at the bottom, made through descriptors: no path may be that long. */
export function deepTree(dir: string, depth: number): void {
  const flags = constants.O_RDONLY | constants.O_DIRECTORY
  let fd = openSync(dir, flags)
  try {
    for (let i = 0; i < depth; i++) {
      mkdirSync(`/proc/self/fd/${fd}/d`)
      const next = openSync(`/proc/self/fd/${fd}/d`, flags)
      closeSync(fd)
      fd = next
    }
    writeFileSync(`/proc/self/fd/${fd}/leaf.txt`, 'bottom')
  } finally {
    closeSync(fd)
  }
}

/** The comment at the end of a zip. */
export function zipComment(zip: Buffer): string {
  const end = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06]))
  return zip.subarray(end + 22, end + 22 + zip.readUInt16LE(end + 20)).toString('latin1')
}
