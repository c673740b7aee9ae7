//! A client certificate's identity as header values: the subject as an RFC 4514 string and
//! the subject alternative names, read from the DER lbd already verified.
use crate::config::tls::tlv;

/// The subject of `cert` (DER), RFC 4514 (most significant RDN last, like nginx's
/// `$ssl_client_s_dn`): `CN=client,O=Example,C=FR`.
pub fn subject(cert: &[u8]) -> Option<String> {
    let name = subject_der(cert)?;
    let mut rdns = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let (_, set, r) = tlv(rest)?;
        rest = r;
        let mut parts = Vec::new();
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, r) = tlv(atvs)?;
            atvs = r;
            let (_, oid, r) = tlv(atv)?;
            let (tag, value, _) = tlv(r)?;
            parts.push(format!("{}={}", attr_name(oid), attr_value(tag, value)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// The subject alternative names of `cert` (DER): `DNS:a.example, URI:spiffe://x/y,
/// IP:10.0.0.1, email:a@example`; other name forms are left out.
pub fn sans(cert: &[u8]) -> Option<String> {
    // tbsCertificate's optional [3] extensions follow subjectPublicKeyInfo (field 6).
    let (_, c, _) = tlv(cert)?;
    let (_, tbs, _) = tlv(c)?;
    let mut rest = tbs;
    let mut ext = None;
    while !rest.is_empty() {
        let (tag, body, r) = tlv(rest)?;
        rest = r;
        if tag == 0xa3 {
            ext = Some(body);
        }
    }
    let (_, mut list, _) = tlv(ext?)?;
    while !list.is_empty() {
        let (_, e, r) = tlv(list)?;
        list = r;
        let (_, oid, mut fields) = tlv(e)?;
        // id-ce-subjectAltName, 2.5.29.17
        if oid != [0x55, 0x1d, 0x11] {
            continue;
        }
        let (mut tag, mut octets, r) = tlv(fields)?;
        if tag == 0x01 {
            // critical flag
            fields = r;
            (tag, octets, _) = tlv(fields)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, mut names, _) = tlv(octets)?;
        let mut out = Vec::new();
        while !names.is_empty() {
            let (tag, v, r) = tlv(names)?;
            names = r;
            let text = String::from_utf8_lossy(v);
            match tag {
                0x81 => out.push(format!("email:{text}")),
                0x82 => out.push(format!("DNS:{text}")),
                0x86 => out.push(format!("URI:{text}")),
                0x87 => match v.len() {
                    4 => out.push(format!(
                        "IP:{}",
                        std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3])
                    )),
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(v);
                        out.push(format!("IP:{}", std::net::Ipv6Addr::from(b)));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        return Some(out.join(", "));
    }
    None
}

/// The contents of tbsCertificate's subject Name.
fn subject_der(cert: &[u8]) -> Option<&[u8]> {
    let (_, c, _) = tlv(cert)?;
    let (_, tbs, _) = tlv(c)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    // serial, signature, issuer, validity; then the subject
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (_, body, _) = tlv(rest)?;
    Some(body)
}

fn attr_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut v: u64 = 0;
    for &b in oid {
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let (a, rest) = if v < 80 {
                    (v / 40, v % 40)
                } else {
                    (2, v - 80)
                };
                parts.push(a.to_string());
                parts.push(rest.to_string());
            } else {
                parts.push(v.to_string());
            }
            v = 0;
        }
    }
    parts.join(".")
}

/// A string value, escaped per RFC 4514 §2.4; other types as `#` and hex of the value.
fn attr_value(tag: u8, v: &[u8]) -> String {
    let text = match tag {
        0x0c | 0x13 | 0x16 => String::from_utf8_lossy(v).into_owned(),
        0x14 => v.iter().map(|&b| char::from(b)).collect(),
        _ => {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            return format!("#{hex}");
        }
    };
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, ch) in text.chars().enumerate() {
        let special = matches!(ch, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && matches!(ch, ' ' | '#'))
            || (i == last && ch == ' ');
        if special {
            out.push('\\');
        }
        if ch.is_control() {
            for b in ch.to_string().bytes() {
                out.push_str(&format!("\\{b:02x}"));
            }
        } else {
            out.push(ch);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_and_sans_of_a_generated_certificate() {
        let kp = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example/web".try_into().expect("uri"),
        ));
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress([10, 0, 0, 1].into()));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Ex, Ample");
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client");
        let cert = p.self_signed(&kp).expect("cert");
        assert_eq!(
            subject(cert.der()).as_deref(),
            Some("CN=client,O=Ex\\, Ample")
        );
        assert_eq!(
            sans(cert.der()).as_deref(),
            Some("DNS:a.example, URI:spiffe://example/web, IP:10.0.0.1")
        );
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
    }
}
