import { existsSync, mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Browser, Locator, Page } from 'playwright-core'
import t from 'tap'
import { startFakeUpstream, text } from './fakes/upstream.js'
import { ADMIN_KEY, build } from './helpers/build.js'

const CHROMIUM = '/usr/bin/chromium'
const TIMEOUT = 30_000

// Only Debian's chromium is usable here (no browser downloads); CI installs it.
const skip = existsSync(CHROMIUM) ? false : `${CHROMIUM} not found (apt-get install chromium; .ci/run does)`

/** Opens an operation (Try it out is on already), presses Execute and returns its status and body. */
async function execute(page: Page, method: string, path: string, params: Record<string, string> = {}) {
  const operation = page.locator(`.opblock-${method}`).filter({ has: page.locator(`.opblock-summary-path[data-path="${path}"]`) })
  await operation.locator('.opblock-summary').first().click()
  // tryItOutEnabled opens operations in "Try it out" mode already; the button then reads "Cancel"
  const tryOut = operation.locator('button.try-out__btn')
  if ((await tryOut.textContent())?.trim() === 'Try it out') await tryOut.click()
  for (const [name, value] of Object.entries(params)) await operation.locator(`tr[data-param-name="${name}"] input`).fill(value)
  await operation.locator('button.execute').click()
  const status = operation.locator('.live-responses-table .response .response-col_status').first()
  await status.waitFor()
  return {
    operation,
    status: (await status.textContent())?.trim(),
    body: (await operation.locator('.live-responses-table .response .response-col_description').first().textContent()) ?? '',
  }
}

t.test('Swagger UI: authorize with a bearer key, run the pre-filled examples, see 2xx', { skip, timeout: 180_000 }, async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  // no sandbox: the page is under test here, not bubblewrap (test/routes/execute.test.ts covers it)
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const address = await app.listen({ port: 0, host: '127.0.0.1' })
  // kept after the test on purpose: the screenshots are for people to look at
  const shots = mkdtempSync(join(tmpdir(), 'oi-docs-screenshots-'))
  t.comment(`screenshots: ${shots}`)
  const shoot = async (target: Page | Locator, name: string) => {
    await target.screenshot({ path: join(shots, name) })
    t.comment(`  ${join(shots, name)}`)
  }

  const { chromium } = await import('playwright-core')
  const browser: Browser = await chromium.launch({
    executablePath: CHROMIUM,
    timeout: TIMEOUT,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  })
  let page: Page | undefined
  let failed = false
  try {
    page = await browser.newPage()
    page.setDefaultTimeout(TIMEOUT)
    await page.goto(`${address}/docs/`, { waitUntil: 'domcontentloaded' })
    await page.waitForSelector('.swagger-ui .information-container .title')
    t.match(await page.textContent('.information-container .title'), /oi-server/, 'the document rendered')

    await page.click('button.btn.authorize')
    await page.waitForSelector('.modal-ux .auth-container')
    t.match(await page.textContent('.modal-ux .auth-container'), /admin\.key[\s\S]*POST \/v1\/keys/, 'the dialog says which key to paste')
    await shoot(page.locator('.modal-ux .modal-dialog-ux, .modal-ux').first(), '1-authorize.png')
    const keyInput = page.locator('.modal-ux .auth-container input').first()
    await keyInput.fill(ADMIN_KEY)
    await page.click('.modal-ux .auth-btn-wrapper button.authorize')
    // once applied, Swagger UI swaps "Authorize" for "Logout" and masks the value
    await page.waitForSelector('.modal-ux .auth-btn-wrapper button[aria-label="Remove authorization"]')
    await page.click('.modal-ux button.btn-done')
    await page.waitForSelector('.modal-ux', { state: 'detached' })

    const metrics = await execute(page, 'get', '/metrics')
    t.equal(metrics.status, '200', 'the rendered response shows 200')
    t.match(metrics.body, /oi_http_requests_total/, 'the metrics body is shown')
    const curl = await metrics.operation.locator('.curl-command').first().textContent()
    t.match(curl, /Authorization: Bearer/, 'the request carried the bearer key')

    const created = await execute(page, 'post', '/v1/sessions')
    t.equal(created.status, '201', 'create session with its pre-filled body: 201')
    t.match(created.body, /"title": "Plots"/)
    const sessionId = /"session_id": "([^"]+)"/.exec(created.body)?.[1]
    t.ok(sessionId, 'the new session id is shown')
    await shoot(created.operation, '2-create-session.png')

    const executed = await execute(page, 'post', '/v1/sessions/{id}/execute', { id: sessionId! })
    t.equal(executed.status, '200', 'execute with its pre-filled body: 200')
    t.match(executed.body, /"content": "2\\n"|"content": "2"/, 'print(1+1) printed 2')
    t.match(executed.body, /"exit_code": 0/)
    await shoot(executed.operation, '3-execute.png')

    upstream.script(text('Hello! How can I help?'))
    const chat = await execute(page, 'post', '/v1/chat')
    t.equal(chat.status, '200', 'chat with its pre-filled body: 200')
    t.match(chat.body, /Hello! How can I help\?/, "the model's answer is shown")
    await shoot(chat.operation, '4-chat.png')
  } catch (err) {
    failed = true
    throw err
  } finally {
    if (page && (failed || !t.passing())) {
      // kept after the test (the fixture dir is otherwise removed at its end)
      t.saveFixture = true
      const file = join(t.testdir({}), 'docs-failure.png')
      await page.screenshot({ path: file, fullPage: true }).catch(() => {})
      t.comment(`screenshot saved to ${file}`)
    }
    await browser.close()
  }
})
