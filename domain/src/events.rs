//! A streaming XML rewriter: events go from reader to writer unless the caller
//! changes, drops or replaces them; it tracks the path of open elements so rules
//! can say "a `<mac>` inside an `<interface>`".

use std::borrow::Cow;

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesStart, BytesText, Event};

use crate::DomainError;

pub(crate) struct Rewriter<'a> {
    reader: Reader<&'a [u8]>,
    writer: Writer<Vec<u8>>,
    /// Local names of the open elements, outermost first.
    path: Vec<String>,
}

fn parse_error(e: impl std::fmt::Display, position: u64) -> DomainError {
    DomainError::Parse(format!("{e} (at byte {position})"))
}

impl<'a> Rewriter<'a> {
    pub fn new(xml: &'a str) -> Self {
        let mut reader = Reader::from_str(xml);
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        Rewriter {
            reader,
            writer: Writer::new(Vec::with_capacity(xml.len())),
            path: Vec::new(),
        }
    }

    /// The open elements around the current event (for an end tag, including the
    /// element being closed).
    pub fn path(&self) -> &[String] {
        &self.path
    }

    /// The innermost open element.
    pub fn current(&self) -> Option<String> {
        self.path.last().cloned()
    }

    /// The next event, or `None` at the end.
    pub fn next(&mut self) -> Result<Option<Event<'a>>, DomainError> {
        let position = self.reader.buffer_position();
        match self.reader.read_event() {
            Ok(Event::Eof) => {
                if self.path.is_empty() {
                    Ok(None)
                } else {
                    Err(DomainError::Parse(format!(
                        "the document ends inside <{}>",
                        self.path.join("><")
                    )))
                }
            }
            Ok(Event::DocType(_)) => Err(DomainError::Doctype),
            Ok(event) => Ok(Some(event)),
            Err(e) => Err(parse_error(e, position)),
        }
    }

    pub fn write(&mut self, event: Event<'_>) -> Result<(), DomainError> {
        self.writer
            .write_event(event)
            .map_err(|e| DomainError::Parse(e.to_string()))
    }

    /// Writes a start tag and enters the element.
    pub fn write_start(&mut self, start: BytesStart<'_>, name: &str) -> Result<(), DomainError> {
        self.write(Event::Start(start))?;
        self.path.push(name.to_string());
        Ok(())
    }

    /// Writes an end tag and leaves the element.
    pub fn write_end(&mut self, end: Event<'_>) -> Result<(), DomainError> {
        self.write(end)?;
        self.path.pop();
        Ok(())
    }

    /// Drops an element: an empty one is simply not written; a start tag is
    /// followed to its end tag and everything in between is dropped.
    pub fn skip(&mut self, event: &Event<'_>) -> Result<(), DomainError> {
        if !matches!(event, Event::Start(_)) {
            return Ok(());
        }
        let mut depth = 1usize;
        while depth > 0 {
            match self.next()? {
                Some(Event::Start(_)) => depth += 1,
                Some(Event::End(_)) => depth -= 1,
                Some(_) => {}
                None => return Err(DomainError::Parse("unclosed element".into())),
            }
        }
        Ok(())
    }

    pub fn finish(self) -> String {
        String::from_utf8(self.writer.into_inner())
            .expect("the writer only writes UTF-8 from UTF-8 input")
    }
}

/// The local name (without prefix) of an element.
pub(crate) fn local(e: &BytesStart<'_>) -> String {
    e.local_name().as_ref().to_string()
}

/// An attribute's unescaped value, by its (unprefixed) name.
pub(crate) fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .ok()
                .map(Cow::into_owned)
        })
}

/// The element with attribute `name` set to `value` (added when missing), order kept.
pub(crate) fn with_attr(e: &BytesStart<'_>, name: &str, value: &str) -> BytesStart<'static> {
    let tag = e.name().as_ref().to_string();
    let mut out = BytesStart::new(tag);
    let mut found = false;
    for a in e.attributes().flatten() {
        let key = a.key.as_ref().to_string();
        if key == name {
            out.push_attribute((key.as_str(), value));
            found = true;
        } else {
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map(Cow::into_owned)
                .unwrap_or_default();
            out.push_attribute((key.as_str(), v.as_str()));
        }
    }
    if !found {
        out.push_attribute((name, value));
    }
    out
}

/// The element without attribute `name`.
pub(crate) fn without_attr(e: &BytesStart<'_>, name: &str) -> BytesStart<'static> {
    let tag = e.name().as_ref().to_string();
    let mut out = BytesStart::new(tag);
    for a in e.attributes().flatten() {
        let key = a.key.as_ref().to_string();
        if key != name {
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map(Cow::into_owned)
                .unwrap_or_default();
            out.push_attribute((key.as_str(), v.as_str()));
        }
    }
    out
}

/// Text content (character references arrive as separate events).
pub(crate) fn text(t: &BytesText<'_>) -> Result<String, DomainError> {
    Ok(t.xml10_content().into_owned())
}
