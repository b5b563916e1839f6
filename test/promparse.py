"""A strict parser of the Prometheus text exposition format 0.0.4, written
to https://prometheus.io/docs/instrumenting/exposition_formats/ to check
what the exporter renders.

parse(text) -> {family: Family}; raises FormatError naming the line for:
a line that is not HELP, TYPE, a comment, a sample or empty; a bad metric
or label name; a label value with a raw newline, an unescaped quote or an
unknown escape; a value that is not a float (NaN, +Inf, -Inf allowed); a
timestamp that is not an integer; a TYPE or HELP given twice, or a TYPE
after the family's samples; the lines of a family not all together; the
same series twice; text that does not end with a newline.
"""

import re

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class FormatError(ValueError):
    pass


class Family(object):
    def __init__(self, name):
        self.name = name
        self.type = None
        self.help = None
        self.samples = {}   # (sample name, ((label, value), ...) sorted) -> float

    def value(self, **labels):
        """The value of the sample with exactly these labels (str values)."""
        return self.samples[(self.name, tuple(sorted(labels.items())))]

    def get(self, default, **labels):
        """value(**labels), or default where there is no such sample."""
        return self.samples.get((self.name, tuple(sorted(labels.items()))), default)


def _unescape(text, allowed, where):
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1:i + 2]
            if nxt not in allowed:
                raise FormatError("%s: bad escape \\%s" % (where, nxt))
            out.append(ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _float(text, where):
    if text in ("NaN", "+Inf", "-Inf", "Inf"):
        return float(text)
    if not re.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", text):
        raise FormatError("%s: %r is not a float" % (where, text))
    return float(text)


def _labels(text, pos, where):
    """Parse '{a="b",...}' from text[pos] ('{'); returns (labels, end)."""
    labels = {}
    pos += 1
    while True:
        while text[pos:pos + 1] in (" ", "\t"):
            pos += 1
        if text[pos:pos + 1] == "}":
            return labels, pos + 1
        m = LABEL_NAME.match(text, pos)
        if not m:
            raise FormatError("%s: bad label name at column %d" % (where, pos))
        name = m.group(0)
        if name in labels:
            raise FormatError("%s: label %s twice" % (where, name))
        pos = m.end()
        while text[pos:pos + 1] in (" ", "\t"):
            pos += 1
        if text[pos:pos + 2] != '="':
            raise FormatError("%s: expected =\" after label %s" % (where, name))
        pos += 2
        end = pos
        while True:
            if end >= len(text):
                raise FormatError("%s: unterminated value of label %s" % (where, name))
            if text[end] == "\\":
                end += 2
            elif text[end] == '"':
                break
            else:
                end += 1
        labels[name] = _unescape(text[pos:end], ("\\", '"', "n"), where)
        pos = end + 1
        while text[pos:pos + 1] in (" ", "\t"):
            pos += 1
        if text[pos:pos + 1] == ",":
            pos += 1
        elif text[pos:pos + 1] != "}":
            raise FormatError("%s: expected , or } after label %s" % (where, name))


def _family_of(name, families):
    """The family a sample name belongs to (histogram/summary suffixes)."""
    for fam in families.values():
        for suffix in SUFFIXES.get(fam.type, ()):
            if name == fam.name + suffix:
                return fam.name
    return name


def parse(text):
    if text and not text.endswith("\n"):
        raise FormatError("the text does not end with a newline")
    families = {}
    done = set()        # families whose group of lines has ended
    current = None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        where = "line %d %r" % (n, line)
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line[1:].lstrip(" \t").split(None, 2)
            if not parts or parts[0] not in ("HELP", "TYPE"):
                continue  # a comment
            if len(parts) < 2 or not METRIC_NAME.fullmatch(parts[1]):
                raise FormatError("%s: bad metric name" % where)
            kind, name = parts[0], parts[1]
            rest = parts[2] if len(parts) > 2 else ""
        else:
            m = METRIC_NAME.match(line)
            if not m:
                raise FormatError("%s: not a sample, HELP, TYPE or comment" % where)
            kind, name = "sample", m.group(0)
        fam_name = _family_of(name, families) if kind == "sample" else name
        if fam_name != current:
            if fam_name in done:
                raise FormatError("%s: the lines of %s are not together" % (where, fam_name))
            if current is not None:
                done.add(current)
            current = fam_name
        fam = families.setdefault(fam_name, Family(fam_name))
        if kind == "HELP":
            if fam.help is not None:
                raise FormatError("%s: second HELP for %s" % (where, name))
            fam.help = _unescape(rest, ("\\", "n"), where)
        elif kind == "TYPE":
            if fam.type is not None:
                raise FormatError("%s: second TYPE for %s" % (where, name))
            if fam.samples:
                raise FormatError("%s: TYPE after samples of %s" % (where, name))
            if rest not in TYPES:
                raise FormatError("%s: unknown type %r" % (where, rest))
            fam.type = rest
        else:
            pos = m.end()
            labels = {}
            if line[pos:pos + 1] == "{":
                labels, pos = _labels(line, pos, where)
            fields = line[pos:].split()
            if line[pos:pos + 1] not in (" ", "\t") or len(fields) not in (1, 2):
                raise FormatError("%s: expected a value and an optional timestamp" % where)
            value = _float(fields[0], where)
            if len(fields) == 2 and not re.match(r"^-?\d+$", fields[1]):
                raise FormatError("%s: bad timestamp %r" % (where, fields[1]))
            series = (name, tuple(sorted(labels.items())))
            if series in fam.samples:
                raise FormatError("%s: the same series twice" % where)
            fam.samples[series] = value
    return families
