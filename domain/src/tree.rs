//! The document as a small tree of quick-xml events.
//!
//! Every event read is kept as it came (comments, processing instructions, unknown
//! elements, namespace declarations, quoting) and written back by quick-xml's writer;
//! only what a caller changes differs. A tree instead of a single pass lets the rules
//! look at a whole `<disk>` (type, source, target) before deciding, and makes "the
//! text of an element" mean what libxml2 (libvirt's parser) means: all its text,
//! CDATA and references joined.
//!
//! Parsing is strict where quick-xml is lenient and libxml2 is not, so that what the
//! checks see is what libvirt will see: no DOCTYPE (entity expansion), only the
//! predefined entities, no attribute given twice (libvirt reads attributes by local
//! name, ignoring prefixes), UTF-8 only, at most [`MAX_DEPTH`] levels.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::Writer;
use quick_xml::XmlVersion;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesEnd, BytesRef, BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;

use crate::{DomainError, MAX_XML_SIZE};

/// libxml2's own default limit; real domain XML is about 6 levels deep.
pub(crate) const MAX_DEPTH: usize = 256;

/// The namespace an element is in, as the reader resolved its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ns {
    None,
    Bound(String),
    /// A prefix with no declaration in scope.
    Undeclared(String),
}

/// One attribute: its name as written, its local name, and its value with
/// references resolved and whitespace normalised (as an XML parser delivers it).
#[derive(Debug, Clone)]
pub(crate) struct Attr {
    pub key: String,
    pub local: String,
    pub value: String,
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    Element(Element),
    /// Text, CDATA, references, comments, processing instructions, declarations.
    Event(Event<'static>),
}

#[derive(Debug, Clone)]
pub(crate) struct Element {
    start: BytesStart<'static>,
    /// The name as written (`q:commandline`).
    pub qname: String,
    /// The name without prefix (`commandline`).
    pub local: String,
    pub ns: Ns,
    attrs: Vec<Attr>,
    /// Written as `<x/>`: stays so while it has no children.
    empty: bool,
    pub children: Vec<Node>,
}

/// A parsed document: the root element with whatever surrounds it.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    nodes: Vec<Node>,
}

fn parse_error(what: impl std::fmt::Display, position: u64) -> DomainError {
    DomainError::Parse(format!("{what} (at byte {position})"))
}

/// The character or predefined entity a reference stands for.
fn resolve_ref(r: &BytesRef<'_>, position: u64) -> Result<String, DomainError> {
    if r.is_char_ref() {
        let c = r
            .resolve_char_ref()
            .map_err(|e| parse_error(e, position))?
            .ok_or_else(|| parse_error("bad character reference", position))?;
        // XML 1.0 `Char`: libxml2 refuses the others, so must we.
        let legal =
            matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && !matches!(c, '\u{FFFE}' | '\u{FFFF}'));
        if !legal {
            return Err(parse_error(
                format!(
                    "character reference to U+{:04X}, which XML does not allow",
                    c as u32
                ),
                position,
            ));
        }
        return Ok(c.to_string());
    }
    let name: &str = r;
    resolve_predefined_entity(name)
        .map(str::to_string)
        .ok_or_else(|| parse_error(format!("undefined entity &{name};"), position))
}

/// The text a text-like event contributes, `None` for other events.
fn text_of<'a>(event: &'a Event<'_>) -> Option<Cow<'a, str>> {
    match event {
        Event::Text(t) => Some(t.xml10_content()),
        Event::CData(t) => Some(t.xml10_content()),
        // Checked when parsed; an unresolvable one never gets here.
        Event::GeneralRef(r) => resolve_ref(r, 0).ok().map(Cow::Owned),
        _ => None,
    }
}

fn read_attrs(start: &BytesStart<'_>, position: u64) -> Result<Vec<Attr>, DomainError> {
    let mut attrs: Vec<Attr> = Vec::new();
    for a in start.attributes() {
        let a = a.map_err(|e| parse_error(e, position))?;
        let key = a.key.as_ref().to_string();
        let local = a.key.local_name().as_ref().to_string();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| parse_error(format!("attribute {key}: {e}"), position))?
            .into_owned();
        if !is_namespace_declaration(&key)
            && let Some(other) = attrs
                .iter()
                .find(|o| !is_namespace_declaration(&o.key) && o.local == local)
        {
            return Err(parse_error(
                format!(
                    "<{}> has attribute {local:?} twice ({} and {key})",
                    start.name().as_ref(),
                    other.key
                ),
                position,
            ));
        }
        attrs.push(Attr { key, local, value });
    }
    Ok(attrs)
}

/// Where one attribute sits in a start tag's text.
struct RawAttr<'a> {
    key: &'a str,
    /// From the name to the closing quote.
    span: std::ops::Range<usize>,
    /// Between the quotes.
    value: std::ops::Range<usize>,
}

/// The attributes of a start tag's text (`name a='1' b="2"`), which quick-xml has
/// already found well-formed; scanning stops at anything unexpected.
fn raw_attrs(content: &str, name_len: usize) -> Vec<RawAttr<'_>> {
    let b = content.as_bytes();
    let skip_space = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = name_len;
    loop {
        i = skip_space(i);
        if i >= b.len() || b[i] == b'/' {
            break;
        }
        let key_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &content[key_start..i];
        i = skip_space(i);
        if i >= b.len() || b[i] != b'=' {
            break;
        }
        i = skip_space(i + 1);
        let Some(&quote) = b.get(i).filter(|q| matches!(q, b'"' | b'\'')) else {
            break;
        };
        let value_start = i + 1;
        let Some(len) = b[value_start..].iter().position(|&c| c == quote) else {
            break;
        };
        i = value_start + len + 1;
        out.push(RawAttr {
            key,
            span: key_start..i,
            value: value_start..value_start + len,
        });
    }
    out
}

fn is_namespace_declaration(key: &str) -> bool {
    key == "xmlns" || key.starts_with("xmlns:")
}

impl Document {
    /// Parses domain XML, refusing what libvirt would read differently (see the
    /// module documentation) and anything over [`MAX_XML_SIZE`].
    pub fn parse(xml: &str) -> Result<Document, DomainError> {
        if xml.len() > MAX_XML_SIZE {
            return Err(DomainError::TooLarge(xml.len()));
        }
        let xml = xml.strip_prefix('\u{FEFF}').unwrap_or(xml);
        let mut reader = NsReader::from_str(xml);
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        config.check_comments = true;
        config.expand_empty_elements = false;
        let mut top: Vec<Node> = Vec::new();
        let mut open: Vec<Element> = Vec::new();
        loop {
            let position = reader.buffer_position();
            let (ns, event) = reader
                .read_resolved_event()
                .map_err(|e| parse_error(e, position))?;
            let ns = match ns {
                ResolveResult::Unbound => Ns::None,
                ResolveResult::Bound(n) => Ns::Bound(n.as_ref().to_string()),
                ResolveResult::Unknown(p) => Ns::Undeclared(p),
            };
            let event = event.into_owned();
            let node = match event {
                Event::Eof => break,
                Event::DocType(_) => return Err(DomainError::Doctype),
                Event::Start(_) if open.len() >= MAX_DEPTH => {
                    return Err(parse_error(
                        format!("elements nested deeper than {MAX_DEPTH}"),
                        position,
                    ));
                }
                Event::Start(start) => {
                    open.push(Element::from_start(start, ns, false, position)?);
                    continue;
                }
                Event::Empty(start) => {
                    Node::Element(Element::from_start(start, ns, true, position)?)
                }
                Event::End(_) => match open.pop() {
                    Some(element) => Node::Element(element),
                    None => return Err(parse_error("end tag without start tag", position)),
                },
                Event::Decl(ref decl) => {
                    if let Some(encoding) = decl.encoding() {
                        let encoding = encoding.map_err(|e| parse_error(e, position))?;
                        if !encoding.eq_ignore_ascii_case("utf-8") {
                            return Err(parse_error(
                                format!(
                                    "the XML declares encoding {encoding:?}; domain XML is UTF-8"
                                ),
                                position,
                            ));
                        }
                    }
                    let version = decl.version().map_err(|e| parse_error(e, position))?;
                    if version != "1.0" {
                        return Err(parse_error("only XML 1.0 is accepted", position));
                    }
                    Node::Event(event)
                }
                Event::GeneralRef(ref r) => {
                    resolve_ref(r, position)?;
                    Node::Event(event)
                }
                other => Node::Event(other),
            };
            match open.last_mut() {
                Some(parent) => parent.children.push(node),
                None => top.push(node),
            }
        }
        if let Some(element) = open.last() {
            return Err(DomainError::Parse(format!(
                "the document ends inside <{}>",
                element.qname
            )));
        }
        let mut roots = 0;
        for node in &top {
            match node {
                Node::Element(_) => roots += 1,
                Node::Event(e) => {
                    if text_of(e).is_some_and(|t| !t.trim().is_empty()) {
                        return Err(DomainError::Parse("text outside the root element".into()));
                    }
                }
            }
        }
        match roots {
            1 => Ok(Document { nodes: top }),
            0 => Err(DomainError::Parse("no root element".into())),
            _ => Err(DomainError::Parse("more than one root element".into())),
        }
    }

    pub fn root(&self) -> &Element {
        self.nodes
            .iter()
            .find_map(|n| match n {
                Node::Element(e) => Some(e),
                Node::Event(_) => None,
            })
            .unwrap_or_else(|| unreachable!("parse guarantees one root element"))
    }

    pub fn root_mut(&mut self) -> &mut Element {
        self.nodes
            .iter_mut()
            .find_map(|n| match n {
                Node::Element(e) => Some(e),
                Node::Event(_) => None,
            })
            .unwrap_or_else(|| unreachable!("parse guarantees one root element"))
    }

    /// Drops the `<?xml …?>` declaration: what libvirt reads then is plain UTF-8.
    pub fn drop_declaration(&mut self) {
        self.nodes
            .retain(|n| !matches!(n, Node::Event(Event::Decl(_))));
    }

    /// The document as XML text.
    pub fn write(&self) -> Result<String, DomainError> {
        let mut writer = Writer::new(Vec::new());
        for node in &self.nodes {
            write_node(&mut writer, node)?;
        }
        String::from_utf8(writer.into_inner())
            .map_err(|e| DomainError::Parse(format!("rewritten XML is not UTF-8: {e}")))
    }
}

fn write_node(writer: &mut Writer<Vec<u8>>, node: &Node) -> Result<(), DomainError> {
    let io = |e: std::io::Error| DomainError::Parse(format!("writing XML: {e}"));
    match node {
        Node::Event(e) => writer.write_event(e.borrow()).map_err(io),
        Node::Element(e) if e.empty && e.children.is_empty() => writer
            .write_event(Event::Empty(e.start.borrow()))
            .map_err(io),
        Node::Element(e) => {
            writer
                .write_event(Event::Start(e.start.borrow()))
                .map_err(io)?;
            for child in &e.children {
                write_node(writer, child)?;
            }
            writer
                .write_event(Event::End(BytesEnd::new(e.qname.as_str())))
                .map_err(io)
        }
    }
}

impl Element {
    fn from_start(
        start: BytesStart<'static>,
        ns: Ns,
        empty: bool,
        position: u64,
    ) -> Result<Element, DomainError> {
        let attrs = read_attrs(&start, position)?;
        Ok(Element {
            qname: start.name().as_ref().to_string(),
            local: start.local_name().as_ref().to_string(),
            ns,
            attrs,
            empty,
            children: Vec::new(),
            start,
        })
    }

    /// Appends an empty child element `<name attr="value"/>` (no namespace).
    pub fn push_child_with_attr(&mut self, name: &str, attr: &str, value: &str) {
        let mut child = Element {
            start: BytesStart::new(name.to_string()),
            qname: name.to_string(),
            local: name.to_string(),
            ns: Ns::None,
            attrs: Vec::new(),
            empty: true,
            children: Vec::new(),
        };
        child.set_attr(attr, value);
        self.children.push(Node::Element(child));
        self.empty = false;
    }

    /// The value of the attribute with this local name (namespace declarations aside),
    /// as libvirt's `xmlGetProp` finds it.
    pub fn attr(&self, local: &str) -> Option<&str> {
        self.attrs()
            .find(|a| a.local == local)
            .map(|a| a.value.as_str())
    }

    /// The attributes, without namespace declarations.
    pub fn attrs(&self) -> impl Iterator<Item = &Attr> {
        self.attrs
            .iter()
            .filter(|a| !is_namespace_declaration(&a.key))
    }

    /// Sets an attribute (by local name; changed in place when present, added last
    /// otherwise). The other attributes keep their exact bytes.
    pub fn set_attr(&mut self, local: &str, value: &str) {
        let escaped = quick_xml::escape::escape(value);
        let mut content = self.raw_content();
        match self
            .attrs
            .iter_mut()
            .find(|a| !is_namespace_declaration(&a.key) && a.local == local)
        {
            Some(a) => {
                a.value = value.to_string();
                if let Some(raw) = raw_attrs(&content, self.qname.len())
                    .into_iter()
                    .find(|r| r.key == a.key)
                {
                    content.replace_range(raw.value, &escaped);
                }
            }
            None => {
                self.attrs.push(Attr {
                    key: local.to_string(),
                    local: local.to_string(),
                    value: value.to_string(),
                });
                content.push_str(&format!(" {local}=\"{escaped}\""));
            }
        }
        self.start = BytesStart::from_content(content, self.qname.len());
    }

    /// Removes an attribute (by local name) with the space before it.
    pub fn remove_attr(&mut self, local: &str) {
        let Some(index) = self
            .attrs
            .iter()
            .position(|a| !is_namespace_declaration(&a.key) && a.local == local)
        else {
            return;
        };
        let attr = self.attrs.remove(index);
        let mut content = self.raw_content();
        if let Some(raw) = raw_attrs(&content, self.qname.len())
            .into_iter()
            .find(|r| r.key == attr.key)
        {
            let start = content[..raw.span.start].trim_end().len();
            content.replace_range(start..raw.span.end, "");
        }
        self.start = BytesStart::from_content(content, self.qname.len());
    }

    /// The start tag's text between `<` and `>` (or `/>`).
    fn raw_content(&self) -> String {
        format!("{}{}", self.qname, self.start.attributes_raw())
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Event(_) => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Event(_) => None,
        })
    }

    /// The first child element with this local name.
    pub fn child(&self, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.local == local)
    }

    pub fn child_mut(&mut self, local: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.local == local)
    }

    /// Removes the child elements for which `drop` says so, at this level only,
    /// with the indentation before each (so no blank line is left).
    pub fn remove_children(&mut self, mut drop: impl FnMut(&Element) -> bool) {
        let mut kept: Vec<Node> = Vec::with_capacity(self.children.len());
        for node in std::mem::take(&mut self.children) {
            if let Node::Element(e) = &node
                && drop(e)
            {
                if matches!(kept.last(), Some(Node::Event(Event::Text(t))) if t.xml10_content().trim().is_empty())
                {
                    kept.pop();
                }
                continue;
            }
            kept.push(node);
        }
        self.children = kept;
    }

    /// Removes, at any depth below this element, the elements `drop` names;
    /// `drop` gets the parent's local name and the element.
    pub fn remove_descendants(&mut self, drop: &dyn Fn(&str, &Element) -> bool) {
        let parent = self.local.clone();
        self.remove_children(|e| drop(&parent, e));
        for child in self.elements_mut() {
            child.remove_descendants(drop);
        }
    }

    /// The element's own text (text, CDATA and references among its children
    /// joined, as libxml2 gives it to libvirt).
    pub fn text(&self) -> String {
        let mut text = String::new();
        for node in &self.children {
            if let Node::Event(e) = node
                && let Some(t) = text_of(e)
            {
                text.push_str(&t);
            }
        }
        text
    }

    /// Replaces the element's text by `text` (comments and child elements stay).
    pub fn set_text(&mut self, text: &str) {
        let first = self
            .children
            .iter()
            .position(|n| matches!(n, Node::Event(e) if text_of(e).is_some()));
        self.children
            .retain(|n| !matches!(n, Node::Event(e) if text_of(e).is_some()));
        if !text.is_empty() {
            let node = Node::Event(Event::Text(BytesText::new(text).into_owned()));
            let at = first
                .unwrap_or(self.children.len())
                .min(self.children.len());
            self.children.insert(at, node);
            self.empty = false;
        }
    }
}
