// Upload one backup with tus-js-client in Node, as an integrator would, and report what happened.
//
// Reads a JSON job on stdin:
//   {endpoint, token, metadata: {field: string}, payloadPath, chunkSize, uploadDataDuringCreation, retryDelays}
// and prints one JSON line on stdout:
//   {ok: true, backupId, uploadUrl, requests: [{method, offset}]}  or  {ok: false, error, status, body}.
// tus-js-client's own retry logic (retryDelays) handles a dropped connection: `requests` shows its HEAD and the
// PATCH that resumes. The Python test (tests/integration/backups/test_backups_tus_js_node.py) signs the envelope, runs
// this script and checks the restored payload.
import { readFileSync } from "node:fs";
import { Upload } from "tus-js-client";

const job = JSON.parse(readFileSync(0, "utf8"));
const payload = readFileSync(job.payloadPath);
const requests = [];
let backupId = null;

const upload = new Upload(payload, {
  endpoint: job.endpoint,
  headers: { Authorization: `Bearer ${job.token}` },
  metadata: job.metadata,
  chunkSize: job.chunkSize,
  uploadDataDuringCreation: job.uploadDataDuringCreation,
  retryDelays: job.retryDelays,
  onBeforeRequest(req) {
    requests.push({ method: req.getMethod(), offset: req.getHeader("Upload-Offset") ?? null });
  },
  onAfterResponse(_req, res) {
    backupId = res.getHeader("Zkeb-Backup-Id") ?? backupId;
  },
  onSuccess() {
    console.log(JSON.stringify({ ok: true, backupId, uploadUrl: upload.url, requests }));
  },
  onError(err) {
    const res = err.originalResponse;
    console.log(
      JSON.stringify({
        ok: false,
        error: String(err.message),
        status: res ? res.getStatus() : null,
        body: res ? res.getBody() : null,
        requests,
      }),
    );
  },
});
upload.start();
