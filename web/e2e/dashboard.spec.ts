// The dashboard as a person uses it, against a real manager, real VMs and the
// scripted model (see crates/atelier/tests/dashboard.rs for the script): create a
// task, watch it move, answer its permission and question in Needs you, see its
// diff, use its terminal, mark it done; the same at a phone's size; then a
// screenshot of every main page at both sizes.
import { expect, test, type Page } from '@playwright/test';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const ARTIFACTS = process.env.ATELIER_E2E_ARTIFACTS ?? 'test-results/screenshots';
const TOKEN = process.env.ATELIER_E2E_TOKEN ?? '';
const SIGNIN = process.env.ATELIER_E2E_SIGNIN ?? 'form';
const WORKSPACE = process.env.ATELIER_E2E_WORKSPACE ?? 'shop';
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 812 };
// A task's first prompt after a restore takes ~90 s under TCG; more under load.
const LONG = 12 * 60_000;
const STEP = 6 * 60_000;

mkdirSync(ARTIFACTS, { recursive: true });

async function shot(page: Page, name: string) {
  // Let the live data settle: the event stream open, no request in flight.
  await page.locator('.live-open').waitFor({ timeout: 10_000 }).catch(() => {});
  await page.waitForLoadState('networkidle', { timeout: 10_000 }).catch(() => {});
  // A full-page shot draws the sticky header where the viewport was: pin it on top.
  await page.addStyleTag({ content: '.top { position: static !important; }' });
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

async function signIn(page: Page) {
  if (SIGNIN === 'form') {
    await page.goto('/');
    // Not signed in: the app sends us to the sign-in page, which comes back here.
    await page.waitForURL(/\/login/);
    await page.locator('input[name="token"], input[type="password"]').first().fill(TOKEN);
    await page.locator('button[type="submit"], input[type="submit"]').first().click();
    await page.waitForURL((u) => !u.pathname.startsWith('/login'));
  } else {
    await page.goto('/');
  }
  await expect(page.getByRole('heading', { name: 'Tasks' })).toBeVisible();
}

async function createTask(page: Page, prompt: string): Promise<string> {
  await page.getByRole('button', { name: 'New task' }).click();
  const form = page.getByRole('form', { name: 'New task' });
  await form.getByLabel('Prompt').fill(prompt);
  await expect(form.getByLabel('Workspace')).toHaveValue(WORKSPACE);
  await expect(form.getByLabel('Start now')).toBeChecked();
  await form.getByRole('button', { name: 'Create task' }).click();
  await expect(form).toBeHidden();
  const title = prompt.split('\n')[0]!;
  const card = page.getByTestId('task-card').filter({ hasText: title }).first();
  await expect(card).toBeVisible();
  const id = await card.getAttribute('data-task');
  expect(id).toMatch(/^tk-/);
  return id!;
}

function nav(page: Page) {
  return page.getByRole('navigation', { name: 'Main' });
}

function card(page: Page, id: string) {
  return page.locator(`[data-testid="task-card"][data-task="${id}"]`);
}

/** Answers the task's permission (once) and then its question (postgres) in Needs you. */
async function answerInNeedsYou(page: Page, id: string, screenshot: string) {
  await nav(page).getByRole('link', { name: /Needs you/ }).click();
  await expect(page.getByRole('heading', { name: 'Needs you' })).toBeVisible();
  const perm = page.locator('[data-testid="attention"][data-kind="permission"]').filter({ has: page.locator(`a[href="/tasks/${id}"]`) });
  await expect(perm).toBeVisible({ timeout: LONG });
  await expect(perm).toContainText('cat feature.txt');
  await shot(page, screenshot);
  await perm.getByRole('button', { name: 'Allow once' }).click();
  await expect(perm).toBeHidden({ timeout: STEP });

  const q = page.locator('[data-testid="attention"][data-kind="question"]').filter({ has: page.locator(`a[href="/tasks/${id}"]`) });
  await expect(q).toBeVisible({ timeout: STEP });
  await expect(q).toContainText('Which database should it use?');
  await expect(q.getByRole('button', { name: /mongodb/ })).toBeVisible();
  await q.getByRole('button', { name: /postgres/ }).click();
  await expect(q).toBeHidden({ timeout: STEP });
}

// Every page runs under the manager's CSP: a violation is a bug (inline script, CDN).
test.beforeEach(({ page }) => {
  const violations: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy/i.test(m.text())) violations.push(m.text());
  });
  (page as Page & { cspViolations?: string[] }).cspViolations = violations;
});

test.afterEach(({ page }) => {
  const v = (page as Page & { cspViolations?: string[] }).cspViolations ?? [];
  expect(v, 'CSP violations').toEqual([]);
});

let desktopTask = '';
let phoneTask = '';

test.describe.serial('dashboard', () => {
  test('desktop: prompt → in progress → permission → question → review → diff → terminal → done', async ({ page }) => {
    await page.setViewportSize(DESKTOP);
    await signIn(page);
    const id = await createTask(page, 'Add feature.txt\n\nIt describes the feature.');
    desktopTask = id;
    // Queued or starting: In progress.
    await expect(page.locator(`[data-lane="progress"] [data-task="${id}"]`)).toBeVisible({ timeout: STEP });
    await shot(page, 'board-progress-desktop');

    await answerInNeedsYou(page, id, 'needs-you-desktop');

    await nav(page).getByRole('link', { name: 'Tasks', exact: true }).click();
    const inReview = page.locator(`[data-lane="review"] [data-task="${id}"]`);
    await expect(inReview).toBeVisible({ timeout: STEP });
    await expect(inReview.getByRole('progressbar')).toHaveAttribute('aria-valuenow', '100');
    await shot(page, 'board-desktop');

    await card(page, id).getByRole('link', { name: 'Add feature.txt' }).click();
    await expect(page.getByTestId('task-page')).toHaveAttribute('data-state', 'review');
    const file = page.locator('[data-testid="diff-file"][data-path="feature.txt"]');
    await expect(file).toBeVisible({ timeout: STEP });
    await expect(file).toContainText('made by the agent');
    await expect(page.getByRole('button', { name: 'Side by side' })).toHaveAttribute('aria-pressed', 'true');
    await shot(page, 'task-desktop');
    await page.getByRole('tab', { name: 'Conversation' }).click();
    await expect(page.getByText('feature.txt holds the feature, on postgres')).toBeVisible();

    // The terminal on its sandbox: run a command, see its output.
    await page.getByRole('tab', { name: 'Terminal' }).click();
    await page.getByRole('button', { name: 'Open terminal' }).click();
    await expect(page.getByTestId('terminal-state')).toContainText('open', { timeout: 60_000 });
    await page.getByTestId('terminal').click();
    await page.keyboard.type('cat /workspace/shop/feature.txt; echo "sum=$((6*7))"\n');
    const rows = page.locator('[data-testid="terminal"] .xterm-rows');
    await expect(rows).toContainText('sum=42', { timeout: 60_000 });
    await expect(rows).toContainText('made by the agent');
    await shot(page, 'terminal-desktop');

    // Done: committed, pushed, sandbox stopped.
    await page.getByRole('button', { name: 'Done', exact: true }).click();
    await expect(page.getByTestId('task-page')).toHaveAttribute('data-state', 'done', { timeout: STEP });
    await nav(page).getByRole('link', { name: 'Tasks', exact: true }).click();
    await expect(page.locator(`[data-lane="done"] [data-task="${id}"]`)).toBeVisible();
  });

  test('phone: the same flow at 375×812', async ({ page }) => {
    await page.setViewportSize(PHONE);
    await signIn(page);
    const id = await createTask(page, 'Add feature.txt from a phone');
    phoneTask = id;
    // Columns are tabs on a phone.
    await page.getByRole('tab', { name: /In progress/ }).click();
    await expect(page.locator(`[data-lane="progress"] [data-task="${id}"]`)).toBeVisible({ timeout: STEP });
    await answerInNeedsYou(page, id, 'needs-you-phone');

    await nav(page).getByRole('link', { name: 'Tasks', exact: true }).click();
    await page.getByRole('tab', { name: /Review/ }).click();
    await expect(page.locator(`[data-lane="review"] [data-task="${id}"]`)).toBeVisible({ timeout: STEP });
    await shot(page, 'board-phone');
    // Nothing wider than the phone, the main navigation included.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    expect(overflow).toBeLessThanOrEqual(0);
    const navOverflow = await nav(page).evaluate((n) => n.scrollWidth - n.clientWidth);
    expect(navOverflow).toBeLessThanOrEqual(0);

    await card(page, id).getByRole('link').first().click();
    const file = page.locator('[data-testid="diff-file"][data-path="feature.txt"]');
    await expect(file).toBeVisible({ timeout: STEP });
    await expect(page.getByRole('button', { name: 'Unified' })).toHaveAttribute('aria-pressed', 'true');
    await shot(page, 'task-phone');
  });

  test('the workspace editor shows the manager’s validation error at its field', async ({ page }) => {
    await page.setViewportSize(DESKTOP);
    await signIn(page);
    await page.goto(`/workspaces/${WORKSPACE}`);
    await page.getByRole('button', { name: 'Edit' }).click();
    const form = page.getByRole('form', { name: 'Edit workspace' });
    await form.getByLabel('Guest path').first().fill('relative/shop');
    await form.getByRole('button', { name: 'Save' }).click();
    const path = form.getByLabel('Guest path').first();
    await expect(path).toHaveAttribute('aria-invalid', 'true');
    const errId = (await path.getAttribute('aria-describedby'))!;
    await expect(page.locator(`[id="${errId}"]`)).toBeVisible();
    await shot(page, 'workspace-edit-desktop');
    await form.getByRole('button', { name: 'Cancel' }).click();
    await expect(form).toBeHidden();
    // Nothing was stored: the definition still has its absolute path.
    await expect(page.getByText('"/workspace/shop"')).toBeVisible();
  });

  test('a sandbox from the workspace: create it, see it run, delete it', async ({ page }) => {
    await page.setViewportSize(DESKTOP);
    await signIn(page);
    await page.goto('/sandboxes');
    await page.getByRole('button', { name: 'New sandbox' }).click();
    const form = page.getByRole('form', { name: 'New sandbox' });
    await form.getByLabel('Name').fill('from-the-ui');
    await expect(form.getByLabel('From')).toHaveValue(`ws:${WORKSPACE}`);
    await form.getByRole('button', { name: 'Create sandbox' }).click();
    // The API answers once the agent does; the page then opens the sandbox.
    await page.waitForURL(/\/sandboxes\/sb-/, { timeout: STEP });
    await expect(page.getByRole('heading', { level: 1 })).toHaveText('from-the-ui');
    await expect(page.locator('.chip.sb-running').first()).toBeVisible();
    page.once('dialog', (d) => void d.accept());
    await page.getByRole('button', { name: 'Delete' }).click();
    await page.waitForURL((u) => u.pathname === '/sandboxes', { timeout: STEP });
    await expect(page.getByTestId('sandbox-row').filter({ hasText: 'from-the-ui' })).toHaveCount(0, { timeout: STEP });
  });

  test('screenshots of every main page at desktop and phone size', async ({ page }) => {
    await signIn(page);
    if (SIGNIN === 'form') {
      // Installable from the manager's origin: a manifest and a service worker on /.
      const manifest = await page.request.get('/manifest.webmanifest');
      expect(manifest.ok()).toBe(true);
      expect((await manifest.json()) as { start_url: string }).toMatchObject({ start_url: '/', display: 'standalone' });
      const scope = await page.evaluate(async () => (await navigator.serviceWorker.ready).scope);
      expect(new URL(scope).pathname).toBe('/');
    }
    // The phone task still has its sandbox (in review).
    await page.goto(`/tasks/${phoneTask || desktopTask}`);
    const sbLink = page.locator('a[href^="/sandboxes/sb-"]').first();
    await expect(sbLink).toBeVisible();
    const sandboxPath = (await sbLink.getAttribute('href'))!;
    const pages: [string, string, string][] = [
      ['board', '/', 'Tasks'],
      ['needs-you', '/needs', 'Needs you'],
      ['task', `/tasks/${desktopTask}`, 'Add feature.txt'],
      ['sandboxes', '/sandboxes', 'Sandboxes'],
      ['sandbox', sandboxPath, ''],
      ['workspaces', '/workspaces', 'Workspaces'],
      ['workspace', `/workspaces/${WORKSPACE}`, WORKSPACE],
    ];
    for (const [size, vp] of [
      ['desktop', DESKTOP],
      ['phone', PHONE],
    ] as const) {
      await page.setViewportSize(vp);
      for (const [name, path, heading] of pages) {
        // The flow's own shots of Needs you (with its items pending) are kept.
        if (name === 'needs-you') continue;
        await page.goto(path);
        if (heading) await expect(page.getByRole('heading', { level: 1 })).toContainText(heading);
        else await expect(page.getByRole('heading', { level: 1 })).toBeVisible();
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        expect(overflow, `${path} is wider than the ${size} viewport`).toBeLessThanOrEqual(0);
        await shot(page, `${name}-${size}`);
      }
    }
  });
});
