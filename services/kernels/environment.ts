/**
 * Which environment variables a tenant may give its kernels (secrets become variables), and the
 * variables the server sets itself. The tenant's variables are applied inside the sandbox, after
 * the drop to the kernel's uid; refusing the names below keeps them from changing how the
 * interpreters and the programs they run start up, whatever process they reach.
 */

/** A POSIX shell identifier (anything else cannot be exported by the launcher), as a JSON Schema pattern. */
export const ENV_NAME_PATTERN = '^[A-Za-z_][A-Za-z0-9_]{0,99}$'
const ENV_NAME = new RegExp(ENV_NAME_PATTERN)

// Read by ld.so, glibc, the interpreters or the shell at start-up (ld.so(8), glibc tunables,
// python(1) ENVIRONMENT, node(1) ENVIRONMENT, bash(1) INVOCATION and Shell Variables).
const RESERVED_NAMES = new Set([
  'GCONV_PATH',
  'GETCONF_DIR',
  'GLIBC_TUNABLES',
  'HOSTALIASES',
  'LOCALDOMAIN',
  'LOCPATH',
  'NIS_PATH',
  'NLSPATH',
  'RESOLV_HOST_CONF',
  'RES_OPTIONS',
  'TMPDIR',
  'TZDIR',
  'BASH_ENV',
  'ENV',
  'SHELLOPTS',
  'BASHOPTS',
  'IFS',
  'PS4',
  'PROMPT_COMMAND',
  'CDPATH',
  'GLOBIGNORE',
  'PERL5OPT',
  'PERL5LIB',
  'PERLLIB',
  'RUBYOPT',
  'RUBYLIB',
  'JAVA_TOOL_OPTIONS',
  '_JAVA_OPTIONS',
  'OPENSSL_CONF',
  'OPENSSL_ENGINES',
])
const RESERVED_PREFIXES = ['LD_', 'MALLOC_', 'PYTHON', 'NODE_', 'BASH_FUNC_', 'OI_']

/** Set by the server for every kernel; a tenant cannot replace them. */
const SERVER_VARIABLES = ['PATH', 'HOME', 'LANG', 'TERM', 'MPLBACKEND', 'MPLCONFIGDIR']

/**
 * Why a tenant may not name a kernel variable `name`, or undefined when it may. Used to refuse a
 * secret at the API (400 `invalid_request`, `param: "name"`) and, again, when a kernel starts, for
 * rows stored before the rule existed.
 */
export function reservedEnvReason(name: string): string | undefined {
  if (!ENV_NAME.test(name)) return 'must be an environment variable name: a letter or _ then letters, digits or _, at most 100 characters'
  const upper = name.toUpperCase()
  if (SERVER_VARIABLES.includes(upper)) return 'is set by the server for every kernel'
  if (RESERVED_NAMES.has(upper) || RESERVED_PREFIXES.some((prefix) => upper.startsWith(prefix)))
    return 'changes how the dynamic loader, libc or an interpreter starts, so it cannot be set for a kernel'
  return undefined
}

/** The variables of `env` a kernel may receive. */
export function tenantVariables(env: Record<string, string> | undefined): [string, string][] {
  return Object.entries(env ?? {}).filter(([name, value]) => reservedEnvReason(name) === undefined && !value.includes('\0'))
}
