# Shared by scripts/install and scripts/uninstall (sourced, not run).
#
# Every change to the system goes through one of two functions so that
# --dry-run and --root can never be bypassed:
#   act CMD...       changes files under $ROOT: printed, then run (not run in --dry-run)
#   host_act CMD...  changes the host itself (users, systemd, udev): as act, but only
#                    printed as skipped with --root, where there is no host to change
# shellcheck shell=bash disable=SC2034  # the constants are used by the sourcing scripts

ROOT=""
DRY_RUN=0

# Paths as the service sees them; file operations prefix them with $ROOT.
readonly OPT_DIR=/opt/wardpost
readonly VENV_DIR=$OPT_DIR/venv
readonly CONFIG_DIR=/etc/wardpost
readonly CONFIG_FILE=$CONFIG_DIR/wardpost.toml
readonly STATE_DIR=/var/lib/wardpost
readonly LOGS_DIR=/var/log/wardpost
readonly UNIT_FILE=/etc/systemd/system/wardpost.service
readonly UDEV_RULES=/etc/udev/rules.d/99-wardpost-serial.rules
readonly CLI_LINK=/usr/local/bin/wardpost
readonly SERVICE_USER=wardpost

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# A command line, quoted so it can be pasted into a shell.
quoted() {
    local out="" word
    for word in "$@"; do out+="${out:+ }$(printf '%q' "$word")"; done
    printf '%s' "$out"
}

act() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(quoted "$@")"
    else
        printf '+ %s\n' "$(quoted "$@")"
        "$@"
    fi
}

host_act() {
    if [[ -n $ROOT ]]; then
        printf '[skipped: --root] %s\n' "$(quoted "$@")"
    elif [[ $1 == systemctl ]] && ((!DRY_RUN)) && ! systemd_running; then
        printf '[skipped: systemd is not running] %s\n' "$(quoted "$@")"
    else
        act "$@"
    fi
}

systemd_running() { [[ -d /run/systemd/system ]]; }

# Parse the options both scripts share. Any other option goes to the caller's
# handler, which returns non-zero if it does not know it, and sets SHIFT_BY when
# it consumed more than one argument.
# usage: parse_common_options OTHER_OPTION_HANDLER "$@"
parse_common_options() {
    local handler=$1
    shift
    while (($#)); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --root)
                (($# >= 2)) || die "--root needs a directory"
                [[ -d $2 ]] || die "--root $2: no such directory"
                ROOT=$(cd "$2" && pwd)
                [[ $ROOT == / ]] && ROOT=""
                shift
                ;;
            -h | --help) usage; exit 0 ;;
            *)
                SHIFT_BY=1
                if ! "$handler" "$@"; then
                    printf '%s: unknown option %s\n\n' "$PROG" "$1" >&2
                    usage >&2
                    exit 2
                fi
                shift "$SHIFT_BY"
                continue
                ;;
        esac
        shift
    done
}

require_root_unless_rehearsing() {
    if [[ -z $ROOT ]] && ((!DRY_RUN)) && ((EUID != 0)); then
        die "run as root (sudo $0 ...), or rehearse with --dry-run or --root DIR"
    fi
}

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
