"""A small S-expression reader for ``xend-config.sxp``.

Lists are Python lists, atoms are strings (xend kept numbers as strings too).
``#`` starts a comment where a token could start; strings take single or
double quotes with backslash escapes. An unknown escape keeps its backslash,
so ``'^localhost\\.localdomain$'`` and ``'^localhost\\\\.localdomain$'`` give
the same regex, as users of both spellings expect.
"""

from __future__ import annotations

from typing import Any

from ferry.errors import ConfigError

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "a": "\a"}
_DELIMITERS = frozenset("()'\"#") | frozenset(" \t\r\n\f\v")


def parse_sxp(text: str, source: str) -> list[Any]:
    """Every top-level expression of the text, in order."""
    return [value for _, value in parse_sxp_lines(text, source)]


def parse_sxp_lines(text: str, source: str) -> list[tuple[int, Any]]:
    """Like :func:`parse_sxp`, each expression with the line it starts on."""
    return _Reader(text, source).read()


class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1

    def fail(self, line: int, why: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line}: {why}")

    def read(self) -> list[tuple[int, Any]]:
        top: list[tuple[int, Any]] = []
        # An explicit stack instead of recursion: deep nesting cannot overflow it.
        stack: list[tuple[int, list[Any]]] = []
        while (token := self.token()) is not None:
            line, kind, value = token
            if kind == "(":
                stack.append((line, []))
                continue
            if kind == ")":
                if not stack:
                    raise self.fail(line, "unbalanced ')': no list is open")
                line, value = stack.pop()
            if stack:
                stack[-1][1].append(value)
            else:
                top.append((line, value))
        if stack:
            raise self.fail(stack[-1][0], "unbalanced '(': the list opened here is never closed")
        return top

    def token(self) -> tuple[int, str, Any] | None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char == "\n":
                self.line += 1
                self.pos += 1
            elif char.isspace():
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif char in "()":
                self.pos += 1
                return self.line, char, None
            elif char in "'\"":
                line = self.line
                return line, "atom", self.string(char)
            else:
                start = self.pos
                while self.pos < len(text) and text[self.pos] not in _DELIMITERS:
                    self.pos += 1
                return self.line, "atom", text[start : self.pos]
        return None

    def string(self, quote: str) -> str:
        start_line = self.line
        text = self.text
        self.pos += 1
        out: list[str] = []
        while self.pos < len(text):
            char = text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char == "\n":
                self.line += 1
            if char == "\\" and self.pos < len(text):
                nxt = text[self.pos]
                self.pos += 1
                if nxt == "\n":
                    self.line += 1
                if nxt in (quote, "\\", "'", '"'):
                    out.append(nxt)
                elif nxt in _ESCAPES:
                    out.append(_ESCAPES[nxt])
                else:
                    out.append("\\" + nxt)
                continue
            out.append(char)
        raise self.fail(start_line, f"unterminated string: the {quote} opened here is never closed")
