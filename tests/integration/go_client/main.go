// golang.org/x/oauth2/clientcredentials against the broker's OAuth facade, as a Go service uses
// it, unchanged. Run by tests/integration/test_facade_clients.py (built in GOPATH mode against
// Debian's golang-golang-x-oauth2-dev):
//
//	go_client TOKEN_URL CLIENT_ID SCOPE   (the client secret in GO_CLIENT_SECRET)
//
// prints one JSON line: per auth style the token, its expiry and whether a second Token() call
// came from the library's own cache; or {"error": ...} and exit 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

type result struct {
	Style       string  `json:"style"`
	AccessToken string  `json:"access_token"`
	TokenType   string  `json:"token_type"`
	ExpiresIn   float64 `json:"expires_in"`
	Scope       string  `json:"scope"`
	Reused      bool    `json:"reused"`
	Error       string  `json:"error,omitempty"`
}

func main() {
	tokenURL, clientID, scope := os.Args[1], os.Args[2], os.Args[3]
	styles := []struct {
		name  string
		style oauth2.AuthStyle
	}{{"client_secret_basic", oauth2.AuthStyleInHeader}, {"client_secret_post", oauth2.AuthStyleInParams}}
	var results []result
	failed := false
	for _, s := range styles {
		config := clientcredentials.Config{
			ClientID:     clientID,
			ClientSecret: os.Getenv("GO_CLIENT_SECRET"),
			TokenURL:     tokenURL,
			Scopes:       strings.Fields(scope),
			AuthStyle:    s.style,
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		source := config.TokenSource(ctx) // reuses its token until 10 s before expiry
		first, err := source.Token()
		r := result{Style: s.name}
		if err != nil {
			r.Error = err.Error()
			failed = true
		} else {
			second, err2 := source.Token()
			r.AccessToken = first.AccessToken
			r.TokenType = first.TokenType
			r.ExpiresIn = time.Until(first.Expiry).Seconds()
			if granted, ok := first.Extra("scope").(string); ok {
				r.Scope = granted
			}
			r.Reused = err2 == nil && second.AccessToken == first.AccessToken
		}
		cancel()
		results = append(results, r)
	}
	line, _ := json.Marshal(results)
	fmt.Println(string(line))
	if failed {
		os.Exit(1)
	}
}
