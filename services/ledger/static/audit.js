// The auditor's page's one script: two checks in the browser, with the browser's own WebCrypto.
//  1. The latest checkpoint (GET /v1/checkpoint, a C2SP signed note) is signed by the key the auditor pins
//     (C2SP verifier key name+hexkeyid+base64(0x01 || Ed25519 public key)): Ed25519 over the note's body.
//  2. An entry is in that checkpoint's tree: its leaf (GET /v1/entries?start=i&limit=1) hashed as
//     SHA-256(0x00 || leaf) and its RFC 9162 inclusion proof (GET /v1/proofs/inclusion?index=i&tree_size=N)
//     lead to the checkpoint's root, nodes hashed as SHA-256(0x01 || left || right). Both requests need an auditor
//     token, which the auditor types in; it is sent with these two requests only, to this origin, and never kept.
// No framework, no remote resource; the page shows every figure without this script.
"use strict";
(() => {
  const enc = new TextEncoder();
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "cvl-pinned-verifier-key";
  let checked = null; // {size, root, origin} of the checkpoint whose signature verified here

  const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const hex = (u) => Array.from(u, (b) => b.toString(16).padStart(2, "0")).join("");
  const cat = (...parts) => {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  };
  const equal = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const sha256 = async (...parts) => new Uint8Array(await crypto.subtle.digest("SHA-256", cat(...parts)));
  const say = (el, text, ok) => { el.textContent = text; el.className = "result " + (ok ? "ok" : "bad"); };

  function parseKey(text) {
    const m = /^([^+\s]+)\+([0-9a-f]{8})\+([A-Za-z0-9+/]+=*)$/.exec(text.trim());
    if (!m) throw new Error("not a verifier key (name+hexkeyid+base64)");
    const raw = b64(m[3]);
    if (raw.length !== 33 || raw[0] !== 1) throw new Error("not an Ed25519 verifier key (0x01 and 32 bytes)");
    return { name: m[1], id: m[2], raw, pub: raw.slice(1) };
  }

  function parseNote(text) {
    const cut = text.indexOf("\n\n");
    if (cut < 0) throw new Error("the checkpoint is not a signed note");
    const body = text.slice(0, cut + 1);
    const lines = body.split("\n");
    if (lines.length < 4 || !/^[1-9][0-9]*$/.test(lines[1])) throw new Error("the note is not a checkpoint");
    const sigs = text.slice(cut + 2).split("\n").filter((l) => l).map((l) => {
      const m = /^\u2014 (\S+) ([A-Za-z0-9+/]+=*)$/.exec(l);
      if (!m) throw new Error("not a signature line: " + l);
      const raw = b64(m[2]);
      return { name: m[1], id: hex(raw.slice(0, 4)), sig: raw.slice(4) };
    });
    return { body, origin: lines[0], size: Number(lines[1]), root: b64(lines[2]), sigs };
  }

  async function ed25519Missing() {
    if (!window.isSecureContext || !window.crypto || !crypto.subtle) {
      return "This page is not in a secure context (HTTPS or localhost), so the browser offers no WebCrypto here.";
    }
    try {
      await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      return null;
    } catch (e) {
      return "This browser's WebCrypto lacks Ed25519 (" + e.name + "), so it cannot check the signature; " +
        "use cvl audit verify, or a browser that has it.";
    }
  }

  async function checkSignature(ev) {
    ev.preventDefault();
    const out = $("signature-result");
    checked = null;
    try {
      const key = parseKey($("pinned-key").value);
      const id = hex((await sha256(enc.encode(key.name), Uint8Array.of(0x0a), key.raw)).slice(0, 4));
      if (id !== key.id) throw new Error("the key's id does not match its name and public key");
      const missing = await ed25519Missing();
      if (missing) return say(out, missing, false);
      const r = await fetch("/v1/checkpoint", { cache: "no-store" });
      if (!r.ok) throw new Error("GET /v1/checkpoint answered " + r.status);
      const note = parseNote(await r.text());
      const sig = note.sigs.find((s) => s.name === key.name && s.id === key.id);
      if (!sig) return say(out, "NOT VERIFIED: the checkpoint has no signature by this key.", false);
      const pub = await crypto.subtle.importKey("raw", key.pub, { name: "Ed25519" }, false, ["verify"]);
      if (!(await crypto.subtle.verify({ name: "Ed25519" }, pub, sig.sig, enc.encode(note.body)))) {
        return say(out, "NOT VERIFIED: the signature by this key does not verify.", false);
      }
      checked = { size: note.size, root: note.root, origin: note.origin };
      try { localStorage.setItem(KEY_STORAGE, $("pinned-key").value.trim()); } catch (e) { /* private mode */ }
      say(out, `Verified: the checkpoint of ${note.origin} at tree size ${note.size}, root ${hex(note.root)}, ` +
        "is signed by the key you pinned.", true);
    } catch (e) {
      say(out, (e.name === "NotSupportedError" ? "This browser's WebCrypto lacks Ed25519: " : "NOT VERIFIED: ") +
        e.message, false);
    }
  }

  // RFC 9162 2.1.3.2: the root an inclusion proof leads to.
  async function rootFromProof(index, size, leafHash, path) {
    let fn = index, sn = size - 1, r = leafHash;
    for (const p of path) {
      if (sn === 0) throw new Error("the proof is longer than the tree allows");
      if (fn % 2 === 1 || fn === sn) {
        r = await sha256(Uint8Array.of(1), p, r);
        if (fn % 2 === 0) while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
      } else {
        r = await sha256(Uint8Array.of(1), r, p);
      }
      fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
    }
    if (sn !== 0) throw new Error("the proof is shorter than the tree needs");
    return r;
  }

  async function checkInclusion(ev) {
    ev.preventDefault();
    const out = $("inclusion-result");
    try {
      let cp = checked, note = "";
      if (!cp) {
        const r = await fetch("/v1/checkpoint", { cache: "no-store" });
        if (!r.ok) throw new Error("GET /v1/checkpoint answered " + r.status);
        cp = parseNote(await r.text());
        note = " (its signature was not checked here: check it above first)";
      }
      const index = Number($("entry-index").value);
      if (!Number.isSafeInteger(index) || index < 0 || index >= cp.size) {
        throw new Error(`the index must be from 0 to ${cp.size - 1}, in the checkpoint's tree`);
      }
      const headers = { Authorization: "Bearer " + $("auditor-token").value.trim() };
      const get = async (url) => {
        const r = await fetch(url, { headers, cache: "no-store" });
        if (!r.ok) throw new Error(`GET ${url} answered ${r.status}`);
        return r.json();
      };
      const entries = (await get(`/v1/entries?start=${index}&limit=1`)).entries;
      if (!entries.length || entries[0].index !== index) throw new Error("the ledger sent no entry " + index);
      const leafHash = await sha256(Uint8Array.of(0), b64(entries[0].leaf));
      const proof = await get(`/v1/proofs/inclusion?index=${index}&tree_size=${cp.size}`);
      const root = await rootFromProof(index, cp.size, leafHash, proof.path.map(b64));
      if (!equal(root, cp.root)) {
        return say(out, `NOT VERIFIED: entry ${index}'s leaf and proof lead to ${hex(root)}, not the ` +
          `checkpoint's root ${hex(cp.root)}.`, false);
      }
      say(out, `Verified: entry ${index} (${entries[0].type}, leaf hash ${hex(leafHash)}) is in the tree of ` +
        `size ${cp.size} whose root the checkpoint signs${note}.`, true);
    } catch (e) {
      say(out, "NOT VERIFIED: " + e.message, false);
    }
  }

  async function start() {
    const sigForm = $("check-signature"), incForm = $("check-inclusion");
    if (!sigForm || !incForm) return;
    try { $("pinned-key").value = localStorage.getItem(KEY_STORAGE) || ""; } catch (e) { /* private mode */ }
    sigForm.addEventListener("submit", checkSignature);
    incForm.addEventListener("submit", checkInclusion);
    sigForm.hidden = incForm.hidden = false;
    $("check-needs-script").textContent = "These two checks run in your browser, with its own SHA-256 and " +
      "Ed25519 (WebCrypto); cvl audit verify checks the whole log.";
    const missing = await ed25519Missing();
    if (missing) say($("signature-result"), missing, false);
  }
  start();
})();
