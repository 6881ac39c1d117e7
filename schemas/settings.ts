import { type Static, type TSchema, Type } from '@sinclair/typebox'

/** What a tenant may change. Server-level safety settings (sandbox, network, upstream) are not here on purpose. */
export const SettingsFields = {
  model: Type.String({ minLength: 1, maxLength: 200 }),
  temperature: Type.Number({ minimum: 0, maximum: 2 }),
  max_tokens: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
  auto_run: Type.Boolean(),
  system_message: Type.String({ maxLength: 50_000 }),
  custom_instructions: Type.String({ maxLength: 50_000 }),
  max_iterations: Type.Integer({ minimum: 1, maximum: 1000 }),
}

export const Settings = Type.Object(SettingsFields, { title: 'Effective settings', description: 'The effective settings' })
export type Settings = Static<typeof Settings>

/**
 * A field or null. A type list, not a union with Null: under the server's type coercion a
 * union lets 0, "" and false fall into the null branch, so `max_tokens: 0` would silently reset
 * the field instead of failing validation.
 */
const orNull = <T extends TSchema & { type: string }>(schema: T) =>
  Type.Optional(Type.Unsafe<Static<T> | null>({ ...schema, type: [schema.type, 'null'] }))

/** PATCH: any subset; `null` resets a field to the server default. */
export const SettingsPatch = Type.Object(
  {
    model: orNull(SettingsFields.model),
    temperature: orNull(SettingsFields.temperature),
    max_tokens: orNull(SettingsFields.max_tokens),
    auto_run: orNull(SettingsFields.auto_run),
    system_message: orNull(SettingsFields.system_message),
    custom_instructions: orNull(SettingsFields.custom_instructions),
    max_iterations: orNull(SettingsFields.max_iterations),
  },
  { additionalProperties: false, examples: [{ temperature: 0.2, custom_instructions: 'Answer briefly.' }] },
)
export type SettingsPatch = Partial<{ [K in keyof Settings]: Settings[K] | null }>

/** A request's `config` (native /v1/chat), which wins over tenant settings for that request. */
export const RunConfig = Type.Object(
  {
    llm: Type.Optional(
      Type.Object({
        model: Type.Optional(SettingsFields.model),
        temperature: Type.Optional(SettingsFields.temperature),
        max_tokens: Type.Optional(SettingsFields.max_tokens),
      }),
    ),
    auto_run: Type.Optional(SettingsFields.auto_run),
    system_message: Type.Optional(SettingsFields.system_message),
    custom_instructions: Type.Optional(SettingsFields.custom_instructions),
    max_iterations: Type.Optional(SettingsFields.max_iterations),
  },
  { additionalProperties: false },
)
export type RunConfig = Static<typeof RunConfig>
