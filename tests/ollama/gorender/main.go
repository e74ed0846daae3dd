// Reference renderer: Go's own text/template, driven the way Ollama drives it (template/template.go at
// ollama/ollama@fb3076099: Parse, Vars, Execute, collate, deleteNode; server/routes.go's SYSTEM rule).
// It generates the expected outputs vendored in tests/ollama/vectors/ (the Python renderer under test is
// checked against them) and needs no Go at test time. Regenerate with:
//   go run tests/ollama/gorender/main.go < cases.jsonl > rendered.jsonl
// Each input line: {"template": ..., "messages": [...], "system": ..., "raw": false, "data": {...}}.
// raw: execute the template once over `data` with missingkey=zero (Go's own text/template semantics);
// otherwise render an Ollama /api/chat prompt from `messages` (+ the Modelfile `system`).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type Case struct {
	Template string           `json:"template"`
	Messages []map[string]any `json:"messages"`
	System   string           `json:"system"`
	Raw      bool             `json:"raw"`
	Data     any              `json:"data"`
	Legacy   bool             `json:"legacy"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
}

var response = parse.ActionNode{NodeType: parse.NodeAction, Pipe: &parse.PipeNode{NodeType: parse.NodePipe,
	Cmds: []*parse.CommandNode{{NodeType: parse.NodeCommand, Args: []parse.Node{
		&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}}}}}}

func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func vars(t *template.Template) []string {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		for _, n := range tt.Root.Nodes {
			for _, v := range identifiers(n) {
				set[strings.ToLower(v)] = true
			}
		}
	}
	var out []string
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func str(m map[string]any, k string) string { s, _ := m[k].(string); return s }

func render(c Case) (out string, err error) {
	// Ollama's deleteNode panics on some legacy templates (a branch emptied after the cut); Ollama's
	// request then fails, so the vector records an error too.
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("panic: %v", r)
		}
	}()
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	var b bytes.Buffer
	if c.Raw {
		err := tmpl.Execute(&b, c.Data)
		return b.String(), err
	}
	v := vars(tmpl)
	if !contains(v, "messages") && !contains(v, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &response)
	}
	var msgs []Message
	for _, m := range c.Messages {
		msgs = append(msgs, Message{Role: str(m, "role"), Content: str(m, "content"), ToolName: str(m, "tool_name")})
	}
	// server/routes.go ChatHandler: the Modelfile SYSTEM goes first when the chat has no system message.
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	if !c.Legacy && contains(v, "messages") {
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated,
			"Tools": nil, "Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		return b.String(), err
	}
	sys, prompt, resp := "", "", ""
	values := func() map[string]any {
		return map[string]any{"System": sys, "Prompt": prompt, "Response": resp, "Think": false,
			"ThinkLevel": "", "IsThinkSet": false}
	}
	execute := func() error {
		if err := tmpl.Execute(&b, values()); err != nil {
			return err
		}
		sys, prompt, resp = "", "", ""
		return nil
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || resp != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			sys = m.Content
		case "user":
			if resp != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			resp = m.Content
		}
	}
	var cut bool
	nodes := deleteNode(tmpl.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	last := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("", &tree))
	if err := last.Execute(&b, values()); err != nil {
		return "", err
	}
	return b.String(), nil
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c Case
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		got, err := render(c)
		row := map[string]any{"go": runtime.Version(), "output": got}
		if err != nil {
			row = map[string]any{"go": runtime.Version(), "error": err.Error()}
		}
		out.Encode(row)
	}
}
