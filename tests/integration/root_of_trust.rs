//! The master keyring under a root of trust, end to end through the real binary: SoftHSM2
//! through the same PKCS#11 module path a production HSM uses, and the passphrase root.
//!
//! Each test makes its own token directory and its own `SOFTHSM2_CONF`, set on the child
//! processes only (the variable is process-global, so this process never sets it), initializes
//! a token with `softhsm2-util`, generates the root key with `tenant-kms keyring init-hsm-key`,
//! and starts `tenant-kms serve` sealed by it. SoftHSM2 missing is a failure, never a skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{BIN, clients, create_tenant, decrypt, encrypt, files_containing};

/// Where distributions put the SoftHSM2 module.
const MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];
const PIN: &str = "5678";
const TOKEN: &str = "kms";
const KEY: &str = "root";

fn module() -> &'static str {
    MODULE_PATHS
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "SoftHSM2 is not installed (no libsofthsm2.so in {MODULE_PATHS:?}): these tests \
                 need it. Install it with `apt-get install -y softhsm2` (.ci/run does this)"
            )
        })
}

/// One SoftHSM2 installation: its own token directory and configuration file.
struct Hsm {
    conf: PathBuf,
    tokens: PathBuf,
}

impl Hsm {
    /// A new token directory under `root/name` with one initialized token labelled `label`.
    fn new(root: &Path, name: &str, label: &str) -> Self {
        let base = root.join(name);
        let tokens = base.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = base.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = Self { conf, tokens };
        let output = hsm
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", "0000", "--pin", PIN])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run softhsm2-util ({e}): install softhsm2 (.ci/run does this)")
            });
        assert!(output.status.success(), "{output:?}");
        hsm
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", &self.conf);
        command
    }

    /// Deletes every key object from the token (its token.object stays: same label, PIN).
    fn remove_keys(&self) {
        let mut removed = 0;
        for slot in std::fs::read_dir(&self.tokens).unwrap() {
            for file in std::fs::read_dir(slot.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.ends_with(".object") && name != "token.object" {
                    std::fs::remove_file(&path).unwrap();
                    removed += 1;
                }
            }
        }
        assert!(removed > 0, "no key object found to remove");
    }
}

/// A data directory, a PIN file and the flags that seal with the HSM.
struct Setup {
    _temp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    pin_file: PathBuf,
}

fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl Setup {
    fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().to_path_buf();
        let pin_file = root.join("pin");
        private_file(&pin_file, &format!("{PIN}\n"));
        Self {
            data: root.join("data"),
            root,
            pin_file,
            _temp: temp,
        }
    }

    fn data(&self) -> String {
        self.data.display().to_string()
    }

    /// `--seal pkcs11` and its flags, with this key label.
    fn hsm_flags(&self, key: &str) -> Vec<String> {
        [
            "--seal",
            "pkcs11",
            "--pkcs11-module",
            module(),
            "--pkcs11-token",
            TOKEN,
            "--pkcs11-key",
            key,
            "--pkcs11-pin-file",
            self.pin_file.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn keyring(&self) -> PathBuf {
        self.data.join("master.keyring")
    }
}

/// Runs the binary (with the HSM's configuration when given); (exit code, stdout, stderr).
fn run(hsm: Option<&Hsm>, args: &[String]) -> (i32, String, String) {
    let mut command = match hsm {
        Some(hsm) => hsm.command(BIN),
        None => Command::new(BIN),
    };
    let output = command.args(args).stdin(Stdio::null()).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn args(parts: &[&str], more: &[String]) -> Vec<String> {
    parts
        .iter()
        .map(|s| (*s).to_owned())
        .chain(more.iter().cloned())
        .collect()
}

/// Removes terminal colour codes from a log line.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running `tenant-kms serve`.
struct Server {
    child: Child,
    url: String,
    /// The start-up lines up to "tenant-kms serving".
    log: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_command(hsm: Option<&Hsm>, data: &str, extra: &[String]) -> Command {
    let mut command = match hsm {
        Some(hsm) => hsm.command(BIN),
        None => Command::new(BIN),
    };
    command
        .args(["serve", "--data-dir", data, "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Changes the (lowercase hex) digit at `at`, keeping the header canonical.
fn flip_hex(text: &str, at: usize) -> String {
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
    String::from_utf8(bytes).unwrap()
}

/// Starts the server and returns once it logs that it serves.
fn start(hsm: Option<&Hsm>, data: &str, extra: &[String]) -> Server {
    start_command(serve_command(hsm, data, extra))
}

/// Runs a serve command and returns once it logs that it serves (its address read from that
/// line); panics with its output if it exits instead.
fn start_command(mut command: Command) -> Server {
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = plain(&line.unwrap());
        log.push_str(&line);
        log.push('\n');
        if line.contains("tenant-kms serving") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .unwrap()
                .to_owned();
            // Keep draining the log so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Server {
                child,
                url: format!("http://{addr}"),
                log,
            };
        }
    }
    let _ = child.wait();
    panic!("the server did not start:\n{log}");
}

/// Starts the server expecting a refusal; returns its stderr.
fn start_refused(hsm: Option<&Hsm>, data: &str, extra: &[String]) -> String {
    let output = serve_command(hsm, data, extra).output().unwrap();
    let stderr = plain(&String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "the server started:\n{stderr}");
    assert!(
        !stderr.contains("tenant-kms serving"),
        "the server served before refusing:\n{stderr}"
    );
    stderr
}

fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The master keys of a plain keyring text, as raw bytes.
fn master_keys(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| hex::decode(l.split_whitespace().nth(1).unwrap()).unwrap())
        .collect()
}

/// Asserts that no file under `dir` holds any of `keys`, raw or in hex (either case).
fn assert_no_key_bytes(dir: &Path, keys: &[Vec<u8>]) {
    assert!(!keys.is_empty());
    for key in keys {
        for needle in [
            key.clone(),
            hex::encode(key).into_bytes(),
            hex::encode_upper(key).into_bytes(),
        ] {
            let hits = files_containing(dir, &needle);
            assert!(hits.is_empty(), "master key bytes found in {hits:?}");
        }
    }
}

/// `keyring init-hsm-key` on `hsm` for the data directory `data`: exit code, stdout, stderr.
fn init_hsm_key(hsm: &Hsm, data: &str, flags: &[String]) -> (i32, String, String) {
    run(
        Some(hsm),
        &args(&["keyring", "init-hsm-key", "--data-dir", data], flags),
    )
}

/// The plain keyring text, through the audited export-controlled unseal.
fn unseal_text(setup: &Setup, hsm: Option<&Hsm>, flags: &[String], name: &str) -> String {
    let out = setup.root.join(name);
    let (code, _, err) = run(
        hsm,
        &args(
            &[
                "keyring",
                "unseal",
                "--export-controlled",
                "--data-dir",
                &setup.data(),
            ],
            &[flags, &["--out".to_owned(), out.display().to_string()]].concat(),
        ),
    );
    assert_eq!(code, 0, "{err}");
    std::fs::read_to_string(out).unwrap()
}

fn audit_operations(setup: &Setup, hsm: Option<&Hsm>, flags: &[String]) -> String {
    let (code, out, err) = run(
        hsm,
        &args(&["audit", "export", "--data-dir", &setup.data()], flags),
    );
    assert_eq!(code, 0, "{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_sealed_keyring_serves_and_holds_no_master_key_bytes() {
    let setup = Setup::new();
    let hsm = Hsm::new(&setup.root, "hsm", TOKEN);
    let flags = setup.hsm_flags(KEY);
    let (code, _, err) = init_hsm_key(&hsm, &setup.data(), &flags);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("generated AES-256 root key 'root' in token 'kms'"),
        "{err}"
    );

    // A plain keyring first (the zero-setup default), warned about at start.
    let server = start(None, &setup.data(), &[]);
    assert!(
        server.log.contains("the master keyring is NOT sealed"),
        "{}",
        server.log
    );
    assert!(
        server.log.contains("--seal pkcs11|passphrase"),
        "{}",
        server.log
    );
    let token = admin_token(&setup.data);
    let (mut keys, mut tenants, _) = clients(&server.url, Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    let before = encrypt(&mut keys, "acme", "ctx", b"sealed later", b"").await;
    drop(server);
    let plain_text = std::fs::read_to_string(setup.keyring()).unwrap();
    let masters = master_keys(&plain_text);

    // Sealed by the token; the token is asked at start only.
    let (code, _, err) = run(
        Some(&hsm),
        &args(&["keyring", "seal", "--data-dir", &setup.data()], &flags),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(
        Some(&hsm),
        &args(&["keyring", "status", "--data-dir", &setup.data()], &[]),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("sealed: pkcs11 (token 'kms', key 'root', mechanism aes-gcm)"),
        "{out}"
    );
    assert_no_key_bytes(&setup.data, &masters);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(setup.keyring())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let server = start(Some(&hsm), &setup.data(), &flags);
    assert!(!server.log.contains("NOT sealed"), "{}", server.log);
    let (mut keys, _, _) = clients(&server.url, Some(&token)).await;
    let opened = decrypt(&mut keys, "acme", "ctx", &before.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"sealed later");
    let after = encrypt(&mut keys, "acme", "ctx", b"while sealed", b"").await;
    let opened = decrypt(&mut keys, "acme", "ctx", &after.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"while sealed");
    drop(server);

    // rotate --master re-seals in memory: the file stays sealed, the new key never on disk.
    let (code, _, err) = run(
        Some(&hsm),
        &args(&["rotate", "--master", "--data-dir", &setup.data()], &flags),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        std::fs::read_to_string(setup.keyring())
            .unwrap()
            .starts_with("tenant-kms sealed keyring v1\n")
    );
    let text = unseal_text(&setup, Some(&hsm), &flags, "exported.keyring");
    let rotated = master_keys(&text);
    assert_eq!(rotated.len(), 2);
    assert_eq!(rotated[0], masters[0]);
    std::fs::remove_file(setup.root.join("exported.keyring")).unwrap();
    assert_no_key_bytes(&setup.root, &rotated);

    let server = start(Some(&hsm), &setup.data(), &flags);
    let (mut keys, _, _) = clients(&server.url, Some(&token)).await;
    let opened = decrypt(&mut keys, "acme", "ctx", &before.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"sealed later");
    drop(server);

    let audit = audit_operations(&setup, Some(&hsm), &flags);
    for operation in ["SealKeyring", "RotateMasterKey", "UnsealKeyring"] {
        assert!(
            audit.contains(&format!("\"operation\":\"{operation}\"")),
            "{operation}: {audit}"
        );
    }
}

#[test]
fn hsm_start_refusals_name_their_cause() {
    let setup = Setup::new();
    let hsm = Hsm::new(&setup.root, "hsm", TOKEN);
    let flags = setup.hsm_flags(KEY);
    let (code, _, err) = init_hsm_key(&hsm, &setup.data(), &flags);
    assert_eq!(code, 0, "{err}");
    // A label already taken is refused (no second key with the same label).
    let (code, _, err) = init_hsm_key(&hsm, &setup.data(), &flags);
    assert_ne!(code, 0);
    assert!(err.contains("already holds a key labelled 'root'"), "{err}");
    // First start with --seal creates the keyring sealed: no plaintext ever written.
    drop(start(Some(&hsm), &setup.data(), &flags));
    let sealed = std::fs::read_to_string(setup.keyring()).unwrap();
    assert!(
        sealed.starts_with("tenant-kms sealed keyring v1\n"),
        "{sealed}"
    );
    let data = setup.data();

    // Without --seal: refused, naming the option.
    let err = start_refused(Some(&hsm), &data, &[]);
    assert!(err.contains("is sealed: start with --seal pkcs11"), "{err}");

    // A missing module.
    let mut no_module = flags.clone();
    no_module[3] = setup.root.join("no-such-module.so").display().to_string();
    let err = start_refused(Some(&hsm), &data, &no_module);
    assert!(err.contains("cannot load the PKCS#11 module"), "{err}");

    // A wrong PIN.
    let bad_pin = setup.root.join("bad-pin");
    private_file(&bad_pin, "0000\n");
    let mut wrong_pin = flags.clone();
    wrong_pin[9] = bad_pin.display().to_string();
    let err = start_refused(Some(&hsm), &data, &wrong_pin);
    assert!(err.contains("wrong PIN for token 'kms'"), "{err}");

    // A different token: same label, same PIN, a key with the same label, another key.
    let other = Hsm::new(&setup.root, "other-hsm", TOKEN);
    let (code, _, err) = init_hsm_key(
        &other,
        // Another HSM, not serving this data directory yet: nothing to audit into.
        setup.root.join("elsewhere").to_str().unwrap(),
        &flags,
    );
    assert_eq!(code, 0, "{err}");
    let err = start_refused(Some(&other), &data, &flags);
    assert!(
        err.contains("does not unseal this keyring: it is not the key that sealed it"),
        "{err}"
    );

    // A key of the wrong type under the root key's label: an EC private key imported into a
    // token that is otherwise right.
    let typed = Hsm::new(&setup.root, "typed-hsm", TOKEN);
    let pem = setup.root.join("ec-key.pem");
    std::fs::write(&pem, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let output = typed
        .command("softhsm2-util")
        .args([
            "--import",
            pem.to_str().unwrap(),
            "--token",
            TOKEN,
            "--label",
            KEY,
        ])
        .args(["--id", "01", "--pin", PIN])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let err = start_refused(Some(&typed), &data, &flags);
    assert!(
        err.contains("key 'root' in token 'kms' is of the wrong type"),
        "{err}"
    );

    // A tampered sealed keyring: the body, the token's IV (header), the check value.
    let (header, body) = sealed.split_at(sealed.find("\nend\n").unwrap() + 5);
    let flip = |text: &str, at: usize| {
        let mut bytes = text.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let header = header.to_owned();
    let iv_at = header.find("iv: ").unwrap() + 4;
    let check_at = header.find("check: ").unwrap() + 7;
    let cases = [
        (
            format!("{header}{}", flip(body, 10)),
            "the file was altered or damaged",
        ),
        (
            format!("{}{body}", flip_hex(&header, iv_at)),
            "does not unseal this keyring",
        ),
        (
            format!("{}{body}", flip_hex(&header, check_at)),
            "the header was altered",
        ),
        (
            sealed.replace("mechanism: aes-gcm\n", "mechanism: aes-gcm\nextra: 1\n"),
            "not in canonical form",
        ),
    ];
    for (tampered, expected) in cases {
        std::fs::write(setup.keyring(), tampered).unwrap();
        let err = start_refused(Some(&hsm), &data, &flags);
        assert!(err.contains(expected), "expected '{expected}':\n{err}");
    }
    std::fs::write(setup.keyring(), &sealed).unwrap();

    // Group-readable: refused like a plain keyring.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(setup.keyring(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = start_refused(Some(&hsm), &data, &flags);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(setup.keyring(), std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(start(Some(&hsm), &data, &flags));

    // The key removed from the token.
    hsm.remove_keys();
    let err = start_refused(Some(&hsm), &data, &flags);
    assert!(
        err.contains("token 'kms' holds no key labelled 'root'"),
        "{err}"
    );
}

#[test]
fn hsm_key_wrap_reseal_to_new_key_and_to_passphrase() {
    let setup = Setup::new();
    let hsm = Hsm::new(&setup.root, "hsm", TOKEN);
    let data = setup.data();
    let flags = setup.hsm_flags(KEY);
    drop(start(None, &data, &[]));
    let masters = master_keys(&std::fs::read_to_string(setup.keyring()).unwrap());
    for key in [KEY, "root-2024"] {
        let (code, _, err) = init_hsm_key(&hsm, &data, &setup.hsm_flags(key));
        assert_eq!(code, 0, "{err}");
    }

    // RFC 5649 key wrap, as for a module without AES-GCM.
    let wrap = args(&["--pkcs11-mechanism", "aes-key-wrap-pad"], &flags);
    let (code, _, err) = run(
        Some(&hsm),
        &args(&["keyring", "seal", "--data-dir", &data], &wrap),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("mechanism aes-key-wrap-pad"), "{err}");
    assert_no_key_bytes(&setup.data, &masters);
    drop(start(Some(&hsm), &data, &flags));
    // A plain keyring cannot be sealed twice: reseal is the command for that.
    let (code, _, err) = run(
        Some(&hsm),
        &args(&["keyring", "seal", "--data-dir", &data], &flags),
    );
    assert_ne!(code, 0);
    assert!(err.contains("is sealed"), "{err}");

    // HSM key rotation: only the new key's label is named.
    let (code, _, err) = run(
        Some(&hsm),
        &args(
            &[
                "keyring",
                "reseal",
                "--data-dir",
                &data,
                "--new-seal",
                "pkcs11",
                "--new-pkcs11-key",
                "root-2024",
            ],
            &flags,
        ),
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(
        Some(&hsm),
        &args(&["keyring", "status", "--data-dir", &data], &[]),
    );
    assert!(out.contains("key 'root-2024', mechanism aes-gcm"), "{out}");
    // The header names the key, so the start needs no --pkcs11-key.
    let no_key: Vec<String> = flags
        .iter()
        .take(6)
        .chain(flags.iter().skip(8))
        .cloned()
        .collect();
    drop(start(Some(&hsm), &data, &no_key));
    let err = start_refused(Some(&hsm), &data, &flags);
    assert!(err.contains("does not unseal this keyring"), "{err}");

    // To a passphrase (an offline recovery root).
    let pass = setup.root.join("passphrase");
    private_file(&pass, "correct horse battery staple\n");
    let (code, _, err) = run(
        Some(&hsm),
        &args(
            &[
                "keyring",
                "reseal",
                "--data-dir",
                &data,
                "--new-seal",
                "passphrase",
                "--new-passphrase-file",
                pass.to_str().unwrap(),
                "--argon2-m-kib",
                "256",
                "--argon2-t",
                "1",
            ],
            &no_key,
        ),
    );
    assert_eq!(code, 0, "{err}");
    let pass_flags = args(
        &[
            "--seal",
            "passphrase",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        &[],
    );
    drop(start(None, &data, &pass_flags));
    assert_no_key_bytes(&setup.data, &masters);
    let audit = audit_operations(&setup, None, &pass_flags);
    for operation in ["CreateRootKey", "SealKeyring", "ResealKeyring"] {
        assert!(
            audit.contains(&format!("\"operation\":\"{operation}\"")),
            "{operation}: {audit}"
        );
    }
    assert!(
        audit.contains("to passphrase (Argon2id m=256 KiB, t=1, p=1)"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_sealed_keyring_serves_and_refuses_wrong_or_tampered() {
    let setup = Setup::new();
    let data = setup.data();
    let pass = setup.root.join("passphrase");
    private_file(&pass, "correct horse battery staple\n");
    let flags = args(
        &[
            "--seal",
            "passphrase",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        &[],
    );
    let server = start(None, &data, &[]);
    let token = admin_token(&setup.data);
    let (mut keys, mut tenants, _) = clients(&server.url, Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    let before = encrypt(&mut keys, "acme", "ctx", b"before sealing", b"").await;
    drop(server);
    let masters = master_keys(&std::fs::read_to_string(setup.keyring()).unwrap());

    // Small Argon2id costs, written into the header; the defaults stay as documented.
    let small = args(&["--argon2-m-kib", "256", "--argon2-t", "1"], &flags);
    let (code, _, err) = run(
        None,
        &args(&["keyring", "seal", "--data-dir", &data], &small),
    );
    assert_eq!(code, 0, "{err}");
    let sealed = std::fs::read_to_string(setup.keyring()).unwrap();
    assert!(
        sealed.contains("kdf: argon2id\nargon2-m-kib: 256\nargon2-t: 1\nargon2-p: 1\n"),
        "{sealed}"
    );
    assert_no_key_bytes(&setup.data, &masters);

    let server = start(None, &data, &flags);
    let (mut keys, _, _) = clients(&server.url, Some(&token)).await;
    let opened = decrypt(&mut keys, "acme", "ctx", &before.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"before sealing");
    drop(server);

    // From the environment, too.
    let mut command = serve_command(
        None,
        &data,
        &args(
            &["--seal", "passphrase", "--passphrase-env", "KMS_PASS"],
            &[],
        ),
    );
    command.env("KMS_PASS", "correct horse battery staple");
    drop(start_command(command));

    // A wrong passphrase.
    let wrong = setup.root.join("wrong");
    private_file(&wrong, "correct horse battery stapler\n");
    let err = start_refused(
        None,
        &data,
        &args(
            &[
                "--seal",
                "passphrase",
                "--passphrase-file",
                wrong.to_str().unwrap(),
            ],
            &[],
        ),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    // Tampered header: a changed cost or salt derives another key; a changed nonce fails
    // the body.
    let cases = [
        (
            sealed.replace("argon2-t: 1\n", "argon2-t: 2\n"),
            "wrong passphrase",
        ),
        (
            flip_hex(&sealed, sealed.find("salt: ").unwrap() + 6),
            "wrong passphrase",
        ),
        (
            flip_hex(&sealed, sealed.find("nonce: ").unwrap() + 7),
            "the file was altered or damaged",
        ),
        (
            sealed.replace("method: passphrase", "method: pkcs11"),
            "header field",
        ),
    ];
    for (tampered, expected) in cases {
        std::fs::write(setup.keyring(), tampered).unwrap();
        let err = start_refused(None, &data, &flags);
        assert!(err.contains(expected), "expected '{expected}':\n{err}");
    }
    std::fs::write(setup.keyring(), &sealed).unwrap();

    // Unseal is explicit: without --export-controlled it is a usage error.
    let out = setup.root.join("plain.keyring");
    let (code, _, err) = run(
        None,
        &args(
            &[
                "keyring",
                "unseal",
                "--data-dir",
                &data,
                "--out",
                out.to_str().unwrap(),
            ],
            &flags,
        ),
    );
    assert_eq!(code, 2, "{err}");
    assert!(!out.exists());
    let text = unseal_text(&setup, None, &flags, "plain.keyring");
    assert_eq!(master_keys(&text), masters);
}
