// The kernel drivers run as plain Python, bash and JavaScript files: copy them next to the build.
import { cpSync } from 'node:fs'

cpSync('services/kernels/drivers', 'dist/services/kernels/drivers', { recursive: true })
