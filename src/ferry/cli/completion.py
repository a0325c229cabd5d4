"""``ferry completion bash``: a bash completion script made from the argument parser.

The script carries the command tree as data (commands, options, what each
value is) and one function that reads the words typed so far. Domain and
host names are asked of ferryd (``ferry _names``), with the same --connect,
--host and --pki as the line being completed, so they name what that ferryd
has. zsh users: ``autoload bashcompinit && bashcompinit`` first.
"""

from __future__ import annotations

import shlex

from ferry.cli.parser_walk import CHOICE, Command

_FUNCTION = r"""
_ferry() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local path=ferry npos=0 i word global=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ " ${_ferry_valopts[$path]} " == *" $word "* ]]; then
            [[ $path == ferry ]] && global+=("$word" "${COMP_WORDS[i+1]}")
            ((i++))
        elif [[ $word == -* ]]; then
            :
        elif [[ $npos -eq 0 && " ${_ferry_subs[$path]} " == *" $word "* ]]; then
            path="$path $word"
        else
            ((npos++))
        fi
    done
    local kind=""
    if [[ " ${_ferry_valopts[$path]} " == *" $prev "* ]]; then
        kind=${_ferry_kinds["$path $prev"]}
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_ferry_opts[$path]}" -- "$cur"))
        return
    elif [[ -n ${_ferry_subs[$path]} && $npos -eq 0 ]]; then
        COMPREPLY=($(compgen -W "${_ferry_subs[$path]}" -- "$cur"))
        return
    else
        local kinds=(${_ferry_pos[$path]})
        kind=${kinds[npos]:-${kinds[-1]}}
        if [[ $npos -ge ${#kinds[@]} && $kind != *'*' ]]; then
            return
        fi
        kind=${kind%'*'}
        [[ $kind == choice ]] && kind=${_ferry_kinds["$path #$npos"]}
    fi
    case $kind in
        domain | host)
            local names
            names=$(ferry "${global[@]}" _names "$kind" 2>/dev/null)
            COMPREPLY=($(compgen -W "$names" -- "$cur")) ;;
        file)
            COMPREPLY=($(compgen -f -- "$cur")) ;;
        choice:*)
            COMPREPLY=($(compgen -W "${kind#choice:}" -- "$cur")) ;;
    esac
}
complete -o filenames -o bashdefault -F _ferry ferry
"""


def bash_script(root: Command) -> str:
    subs: dict[str, str] = {}
    opts: dict[str, str] = {}
    valopts: dict[str, str] = {}
    kinds: dict[str, str] = {}
    positions: dict[str, str] = {}
    for command in root.every():
        key = command.name  # "ferry", "ferry lab up": bash's keys cannot be empty
        subs[key] = " ".join(c.path[-1] for c in command.subcommands)
        opts[key] = " ".join(["--help", *(f for o in command.options for f in o.flags)])
        valopts[key] = " ".join(f for o in command.options if o.takes_value for f in o.flags)
        for option in command.options:
            for flag in option.flags:
                kinds[f"{key} {flag}"] = _kind(option.kind, option.choices)
        words = []
        for n, arg in enumerate(command.positionals):
            words.append(arg.kind + ("*" if arg.repeats else ""))
            if arg.kind == CHOICE:
                kinds[f"{key} #{n}"] = _kind(arg.kind, arg.choices)
        positions[key] = " ".join(words)
    lines = ["# bash completion for ferry; made by `ferry completion bash`.", ""]
    for name, table in (("subs", subs), ("opts", opts), ("valopts", valopts),
                        ("kinds", kinds), ("pos", positions)):  # fmt: skip
        lines.append(f"declare -gA _ferry_{name}=(")
        lines += [f"    [{shlex.quote(k)}]={shlex.quote(v)}" for k, v in table.items()]
        lines.append(")")
    return "\n".join(lines) + "\n" + _FUNCTION.lstrip("\n")


def _kind(kind: str, choices: tuple[str, ...]) -> str:
    return f"choice:{' '.join(choices)}" if kind == CHOICE else kind
