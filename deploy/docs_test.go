package deploy_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// shellCommands returns the commands of the ```sh blocks in a Markdown
// text, each with its continuation lines and multi-line quoted arguments.
func shellCommands(markdown string) []string {
	var cmds []string
	var cur strings.Builder
	in := false
	for _, line := range strings.Split(markdown, "\n") {
		if strings.HasPrefix(line, "```") {
			in = !in && (line == "```sh" || line == "```bash")
			cur.Reset()
			continue
		}
		if !in || (cur.Len() == 0 && (strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#"))) {
			continue
		}
		cur.WriteString(line)
		cur.WriteString("\n")
		s := cur.String()
		// A command ends at a line without a continuation, outside quotes.
		if strings.Count(s, "'")%2 == 0 && !strings.HasSuffix(strings.TrimRight(line, " "), "\\") {
			cmds = append(cmds, strings.TrimSpace(s))
			cur.Reset()
		}
	}
	return cmds
}

// section returns a Markdown heading's text up to the next heading of the
// same level.
func section(markdown, heading string) string {
	_, rest, ok := strings.Cut(markdown, "\n"+heading+"\n")
	if !ok {
		return ""
	}
	level := strings.Fields(heading)[0] + " "
	if i := strings.Index(rest, "\n"+level); i >= 0 {
		rest = rest[:i]
	}
	return rest
}

// docCommand is a command of a shell example and the document it is in.
type docCommand struct{ path, cmd string }

// docsCommands returns the commands of the shell examples in the README and
// docs/.
func docsCommands(t *testing.T) []docCommand {
	t.Helper()
	docs, _ := filepath.Glob("../docs/*.md")
	docs = append(docs, "../README.md")
	var out []docCommand
	for _, path := range docs {
		for _, cmd := range shellCommands(readFile(t, path)) {
			out = append(out, docCommand{path, cmd})
		}
	}
	return out
}

// TestDocsShellSyntax checks that every shell example in the README and
// docs/ is valid shell, so that copying one never starts with a quoting
// error.
func TestDocsShellSyntax(t *testing.T) {
	t.Parallel()
	cmds := docsCommands(t)
	for _, c := range cmds {
		if out, err := exec.Command("bash", "-n", "-c", c.cmd).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s\n%s", c.path, err, c.cmd, out)
		}
	}
	if len(cmds) < 20 {
		t.Errorf("found only %d shell examples", len(cmds))
	}
}

// runReadmeExamples runs the curl commands of the README's "Try it"
// section, as written, against the sandbox server: the first sends a
// message, the rest use its id.
func runReadmeExamples(t *testing.T, s sandbox) {
	var curls []string
	for _, cmd := range shellCommands(section(readFile(t, "../README.md"), "## Try it")) {
		if strings.HasPrefix(cmd, "curl ") {
			curls = append(curls, cmd)
		}
	}
	if len(curls) < 4 {
		t.Fatalf("README's Try it section has %d curl commands, want the send and the status commands", len(curls))
	}
	id := ""
	for i, cmd := range curls {
		// Fail on an HTTP error status; the README leaves that out for
		// brevity.
		script := `curl() { command curl --fail-with-body --show-error --max-time 30 "$@"; }` + "\n" +
			strings.ReplaceAll(cmd, "localhost:8080", s.http)
		c := exec.Command("bash", "-c", script)
		c.Env = append(os.Environ(), "KEY="+s.key, "ID="+id)
		out, err := c.CombinedOutput()
		// The sandbox delivers at once, so the message is usually final
		// before the cancel example runs; that answer is a documented 409.
		if err != nil && strings.Contains(cmd, ":cancel") && strings.Contains(string(out), `"NOTHING_TO_CANCEL"`) {
			err = nil
		}
		if err != nil {
			t.Errorf("README example failed: %v\n%s\n%s", err, cmd, out)
			continue
		}
		if i == 0 {
			var resp struct{ ID string }
			if err := json.Unmarshal(out, &resp); err != nil || resp.ID == "" {
				t.Fatalf("README send example: no message id in %q (%v)", out, err)
			}
			id = resp.ID
		}
	}
}
