//! Test certificates, made by the test that uses them (never committed keys): a CA, leaves it
//! signs (ECDSA P-256), written as PEM files into a temp folder.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SerialNumber, date_time_ymd,
};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh folder under the system temp dir (removed by [`Pki`]'s drop).
fn temp_dir() -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lbd-pki-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A test CA and the folder its files go to.
pub struct Pki {
    /// Where every file is written.
    pub dir: PathBuf,
    /// The CA certificate, PEM (give it to clients as their trust anchor).
    pub ca_pem: String,
    /// The CA certificate's file.
    pub ca_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

/// A leaf certificate and key written to files.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate (leaf only) file.
    pub cert: PathBuf,
    /// The private key (PKCS#8) file.
    pub key: PathBuf,
    /// The certificate's PEM.
    pub cert_pem: String,
}

/// What a leaf is made of.
#[derive(Debug, Clone, Default)]
pub struct LeafOpts {
    /// Subject alternative names (DNS).
    pub names: Vec<String>,
    /// Common name of the subject.
    pub cn: String,
    /// Serial number.
    pub serial: u64,
    /// Make it already expired (valid 2000–2001).
    pub expired: bool,
    /// The leaf's private key as PKCS#8 PEM (e.g. an RSA key from `openssl genpkey`, which
    /// ring cannot generate); a new ECDSA P-256 key when `None`.
    pub key_pem: Option<String>,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = temp_dir();
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA cert");
        let ca_pem = cert.pem();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write CA");
        Pki {
            dir,
            ca_pem,
            ca_file,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf signed by the CA, written as `<file>.crt` / `<file>.key`.
    pub fn leaf(&self, file: &str, opts: &LeafOpts) -> Leaf {
        let key = match &opts.key_pem {
            Some(pem) => KeyPair::from_pem(pem).expect("leaf key PEM"),
            None => KeyPair::generate().expect("leaf key"),
        };
        let mut params = CertificateParams::new(opts.names.clone()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, &opts.cn);
        params.serial_number = Some(SerialNumber::from(opts.serial));
        if opts.expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        } else {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2090, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            cert_pem: cert.pem(),
        };
        std::fs::write(&leaf.cert, &leaf.cert_pem).expect("write cert");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        leaf
    }

    /// Writes `contents` to `file` in the folder.
    pub fn write(&self, file: &str, contents: &[u8]) -> PathBuf {
        let p = self.dir.join(file);
        std::fs::write(&p, contents).expect("write file");
        p
    }

    /// A path in the folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `path` as a TOML string value.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}
