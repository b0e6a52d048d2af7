// What a web app on another origin than the API does with tus-js-client and fetch: create, upload, pause and resume
// (HEAD), terminate, restore (whole, then resumed with Range + If-Range). `window.zkebScenario(job)` returns what
// happened; the Python test judges it.
"use strict";

window.zkebScenario = async function zkebScenario(job) {
  const auth = { Authorization: `Bearer ${job.token}` };
  const requests = [];

  function options(extra) {
    return {
      endpoint: `${job.api}/api/v1/uploads`,
      headers: auth,
      chunkSize: job.chunkSize,
      retryDelays: null,
      storeFingerprintForResuming: false,
      onBeforeRequest(req) {
        requests.push({ method: req.getMethod(), offset: req.getHeader("Upload-Offset") ?? null });
      },
      ...extra,
    };
  }

  async function blobOf(path) {
    return (await fetch(path)).blob();
  }

  async function sha256Hex(buffer) {
    const digest = await crypto.subtle.digest("SHA-256", buffer);
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // Uploads until the first chunk is stored, then stops: abort() pauses, abort(true) terminates (DELETE).
  function uploadFirstChunk(blob, metadata, terminate) {
    return new Promise((resolve, reject) => {
      const upload = new tus.Upload(
        blob,
        options({
          metadata,
          onChunkComplete() {
            upload.abort(terminate).then(() => resolve(upload.url), reject);
          },
          onError: reject,
          onSuccess: () => reject(new Error("the upload finished before it could be stopped")),
        }),
      );
      upload.start();
    });
  }

  // Resumes an upload from its URL: tus-js-client asks the offset with HEAD, then PATCHes the rest.
  function resume(blob, uploadUrl) {
    return new Promise((resolve, reject) => {
      let backupId = null;
      const upload = new tus.Upload(
        blob,
        options({
          uploadUrl,
          onAfterResponse(_req, res) {
            backupId = res.getHeader("Zkeb-Backup-Id") || backupId;
          },
          onError: reject,
          onSuccess: () => resolve(backupId),
        }),
      );
      upload.start();
    });
  }

  if (job.expectRefusal) {
    const blob = await blobOf(job.main.payloadPath);
    const outcome = await uploadFirstChunk(blob, job.main.metadata, false).then(
      () => "uploaded",
      (err) => String(err.message || err),
    );
    const restore = await fetch(`${job.api}/api/health/live`).then(
      (res) => `status ${res.status}`,
      (err) => `${err.name}: ${err.message}`,
    );
    return { uploadOutcome: outcome, fetchOutcome: restore, requests };
  }

  // Discovery: the app's own OPTIONS (after the browser's preflight for it) reads the server's tus limits.
  const discovered = await fetch(`${job.api}/api/v1/uploads`, { method: "OPTIONS", headers: { "Tus-Resumable": "1.0.0" } });

  // Create and upload the first chunk, pause, then resume with HEAD until the completing PATCH commits.
  const main = await blobOf(job.main.payloadPath);
  const uploadUrl = await uploadFirstChunk(main, job.main.metadata, false);
  const backupId = await resume(main, uploadUrl);

  // Terminate another upload after its first chunk; the server then no longer knows it.
  const other = await blobOf(job.terminated.payloadPath);
  const terminatedUrl = await uploadFirstChunk(other, job.terminated.metadata, true);
  const afterTermination = await fetch(terminatedUrl, { method: "HEAD", headers: { ...auth, "Tus-Resumable": "1.0.0" } });

  // Restore: the whole payload, then a download resumed halfway with Range + If-Range on the exposed ETag.
  const payloadUrl = `${job.api}/api/v1/backups/${backupId}/payload`;
  const whole = await fetch(payloadUrl, { headers: auth });
  const wholeBytes = await whole.arrayBuffer();
  const etag = whole.headers.get("ETag");
  const half = Math.floor(wholeBytes.byteLength / 2);
  const first = await fetch(payloadUrl, { headers: { ...auth, Range: `bytes=0-${half - 1}` } });
  const firstBytes = new Uint8Array(await first.arrayBuffer());
  const rest = await fetch(payloadUrl, { headers: { ...auth, Range: `bytes=${half}-`, "If-Range": etag } });
  const restBytes = new Uint8Array(await rest.arrayBuffer());
  const joined = new Uint8Array(firstBytes.length + restBytes.length);
  joined.set(firstBytes);
  joined.set(restBytes, firstBytes.length);

  return {
    discovery: {
      status: discovered.status,
      tusVersion: discovered.headers.get("Tus-Version"),
      tusMaxSize: discovered.headers.get("Tus-Max-Size"),
    },
    backupId,
    uploadUrl,
    requests,
    terminatedStatus: afterTermination.status,
    restore: {
      status: whole.status,
      sha256: await sha256Hex(wholeBytes),
      etag,
      contentLength: whole.headers.get("Content-Length"),
      acceptRanges: whole.headers.get("Accept-Ranges"),
    },
    resumedDownload: {
      statuses: [first.status, rest.status],
      contentRange: rest.headers.get("Content-Range"),
      sha256: await sha256Hex(joined),
    },
  };
};
