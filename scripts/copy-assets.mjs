// The kernel drivers and the seccomp filter generator run as plain Python, bash and JavaScript
// files: copy them next to the build.
import { cpSync } from 'node:fs'

cpSync('services/kernels/drivers', 'dist/services/kernels/drivers', { recursive: true })
cpSync('services/kernels/seccomp_filter.py', 'dist/services/kernels/seccomp_filter.py')
