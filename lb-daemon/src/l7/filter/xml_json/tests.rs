//! The mapping of `docs/xml-json.md`, rule by rule.
use super::*;

fn to_json(xml: &str) -> String {
    String::from_utf8(from_xml::convert(xml.as_bytes()).expect("converts")).expect("utf-8")
}

fn to_xml(json: &str) -> String {
    let out = to_xml::convert(json.as_bytes(), "root").expect("converts");
    let s = String::from_utf8(out).expect("utf-8");
    s.strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
        .expect("declaration")
        .to_owned()
}

#[test]
fn text_only_element_is_a_string_and_empty_is_null() {
    assert_eq!(to_json("<a>hi</a>"), r#"{"a":"hi"}"#);
    assert_eq!(to_json("<a/>"), r#"{"a":null}"#);
    assert_eq!(to_json("<a></a>"), r#"{"a":null}"#);
    assert_eq!(to_json("<a> </a>"), r#"{"a":" "}"#);
}

#[test]
fn attributes_text_and_children() {
    assert_eq!(
        to_json(r#"<a id="1" x='y'>t</a>"#),
        r##"{"a":{"@id":"1","@x":"y","#text":"t"}}"##
    );
    assert_eq!(
        to_json("<a>\n  <b>1</b>\n  <c/>\n</a>"),
        r#"{"a":{"b":"1","c":null}}"#
    );
}

#[test]
fn repeated_children_become_arrays_in_order() {
    assert_eq!(
        to_json("<l><i>1</i><j/><i>2</i><i>3</i></l>"),
        r#"{"l":{"i":["1","2","3"],"j":null}}"#
    );
    // Many distinct names: the index takes over from the scan and keeps grouping right.
    let xml: String = (0..20).map(|i| format!("<e{i}/><e{i}>x</e{i}>")).collect();
    let json = to_json(&format!("<r>{xml}</r>"));
    for i in 0..20 {
        assert!(json.contains(&format!(r#""e{i}":[null,"x"]"#)), "{json}");
    }
}

#[test]
fn namespaces_keep_prefixes_and_declarations() {
    assert_eq!(
        to_json(r#"<s:E xmlns:s="urn:s" xmlns="urn:d"><s:B>1</s:B></s:E>"#),
        r#"{"s:E":{"@xmlns:s":"urn:s","@xmlns":"urn:d","s:B":"1"}}"#
    );
}

#[test]
fn cdata_references_and_unicode_are_text() {
    assert_eq!(to_json("<a><![CDATA[<x> & y]]></a>"), r#"{"a":"<x> & y"}"#);
    assert_eq!(to_json("<a>&lt;&#233;&#x263A;&amp;</a>"), r#"{"a":"<é☺&"}"#);
    assert_eq!(to_json("<ü>日本</ü>"), r#"{"ü":"日本"}"#);
    // Whitespace that is CDATA is content.
    assert_eq!(
        to_json("<a><![CDATA[ ]]><b/></a>"),
        r##"{"a":{"#text":" ","b":null}}"##
    );
}

#[test]
fn comments_pis_and_declaration_are_dropped() {
    assert_eq!(
        to_json(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!-- c --><?pi x?><a>1<!-- c --></a>\n"
        ),
        r#"{"a":"1"}"#
    );
}

#[test]
fn malformed_xml_is_refused() {
    for bad in [
        "",
        "<a>",
        "<a></b>",
        "<a/><b/>",
        "text",
        "<a>&nope;</a>",
        "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a/>",
        "<a x=\"1\" x=\"2\"/>",
        "<a>1</a>tail",
    ] {
        assert!(from_xml::convert(bad.as_bytes()).is_err(), "{bad:?}");
    }
    assert!(from_xml::convert(b"<a>\xff</a>").is_err());
    let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
    assert!(from_xml::convert(deep.as_bytes()).is_err());
}

#[test]
fn json_to_xml_inverts_the_mapping() {
    assert_eq!(
        to_xml(r##"{"a":{"@id":"1","#text":"t","b":["1","2"],"c":null}}"##),
        r#"<a id="1">t<b>1</b><b>2</b><c/></a>"#
    );
    assert_eq!(to_xml(r#"{"a":"x<&>\"y"}"#), r#"<a>x&lt;&amp;&gt;"y</a>"#);
    assert_eq!(
        to_xml(r#"{"a":{"@q":"\"\n\t"}}"#),
        r#"<a q="&quot;&#10;&#9;"/>"#
    );
    assert_eq!(to_xml(r#"{"a":"\r\n"}"#), "<a>&#13;\n</a>");
}

#[test]
fn json_without_one_root_member_is_wrapped() {
    assert_eq!(
        to_xml(r#"{"a":1,"b":true}"#),
        "<root><a>1</a><b>true</b></root>"
    );
    assert_eq!(
        to_xml(r#"[1,[2,3]]"#),
        "<root><item>1</item><item><item>2</item><item>3</item></item></root>"
    );
    assert_eq!(to_xml(r#"{"a":[1,2]}"#), "<root><a>1</a><a>2</a></root>");
    assert_eq!(to_xml(r#""s""#), "<root>s</root>");
    assert_eq!(to_xml("{}"), "<root/>");
}

#[test]
fn json_with_no_xml_form_is_refused() {
    for bad in [
        "",
        "{",
        r#"{"a b":1}"#,
        r#"{"a":{"@x":{"y":1}}}"#,
        r##"{"a":{"#text":[1]}}"##,
        r#"{"a":"\u0001"}"#,
        r#"{"1a":null}"#,
    ] {
        assert!(to_xml::convert(bad.as_bytes(), "root").is_err(), "{bad:?}");
    }
}

#[test]
fn round_trips_as_documented() {
    for xml in [
        r#"<a id="1"><b>x</b><b>y</b><c/><d k="v"/></a>"#,
        r#"<s:E xmlns:s="urn:s"><s:B>1</s:B></s:E>"#,
        "<a>日本 &lt;ok&gt;</a>",
    ] {
        let json = to_json(xml);
        let back = to_xml(&json);
        assert_eq!(to_json(&back), json, "{xml} -> {json} -> {back}");
    }
}

#[test]
fn content_types_and_accept() {
    let mut h = HeaderMap::new();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("Application/XML; charset=utf-8"),
    );
    assert_eq!(body_syntax(&h), Some(Syntax::Xml));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/soap+xml"),
    );
    assert_eq!(body_syntax(&h), Some(Syntax::Xml));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    assert_eq!(body_syntax(&h), Some(Syntax::Json));
    h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    assert_eq!(body_syntax(&h), None);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.remove(CONTENT_ENCODING);
    assert_eq!(body_syntax(&h), None);

    let mut a = HeaderMap::new();
    a.insert(
        ACCEPT,
        HeaderValue::from_static("application/xml, application/json;q=0"),
    );
    assert!(accepts(&a, Syntax::Xml));
    assert!(!accepts(&a, Syntax::Json));
    a.insert(ACCEPT, HeaderValue::from_static("text/*"));
    assert!(!accepts(&a, Syntax::Json));
    a.insert(ACCEPT, HeaderValue::from_static("*/*;q=0.1"));
    assert!(accepts(&a, Syntax::Json));
}
